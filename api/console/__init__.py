"""The web console: `GET /ui` and its assets, served by every API replica from this package.

The page is plain HTML, CSS and a little JavaScript (`static/`), with no build step. It calls the
same HTTP API as any client (`/stats`, `/timers`, ...), with the same keys, rules and limits, and
puts every value it shows into the page as text. Each answer here carries a strict
Content-Security-Policy (only this origin's own script, style and connections; no inline script
or style; no framing), `X-Content-Type-Options: nosniff`, and an `ETag` that a browser
revalidates (`Cache-Control: no-cache`), so an upgraded timerd is never served stale.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.errors import error_response

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE = "index.html"


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the console, read once."""

    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of `static/` by name, with its content type and a strong ETag."""
    assets = {}
    for entry in (importlib.resources.files(__package__) / "static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    return assets


class Console:
    """The console's routes over the assets loaded at start."""

    def __init__(self) -> None:
        self.assets = load_assets()

    def page(self, request: Request) -> Response:
        """`GET /ui`: the console's one page (no key needed: it holds no data)."""
        return self._serve(request, self.assets[PAGE])

    def asset(self, request: Request) -> Response:
        """`GET /ui/static/{name}`: a stylesheet, script or icon of the console."""
        asset = self.assets.get(request.path_params["name"])
        if asset is None:
            response = error_response(404, "not_found", "no such file")
            response.headers.update(SECURITY_HEADERS)
            return response
        return self._serve(request, asset)

    @staticmethod
    def _serve(request: Request, asset: Asset) -> Response:
        headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, headers={**headers, "Content-Type": asset.content_type})

    def routes(self) -> list[Route]:
        """`/ui` and `/ui/static/{name}`."""
        return [
            Route("/ui", self.page, methods=["GET"]),
            Route("/ui/static/{name}", self.asset, methods=["GET"]),
        ]
