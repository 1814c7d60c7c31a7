"""The bound on a request's head: its request line and headers together.

uvicorn's httptools parser (the one it picks when installed) sets no bound on headers of its own,
so a 1 MB header reached the app; h11's bound (`h11_max_incomplete_event_size`) is set to the same
limit by the CLI. This middleware holds for both: over the limit, the answer is a JSON 431 and
the app never runs. A client that sends its head slowly is for the load balancer in front to cut
off (deploy/nginx.conf: `client_header_timeout`, `large_client_header_buffers`).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response

# What the head costs beyond the names, values and target: " " twice and " HTTP/1.1\r\n" on the
# request line, ": " and "\r\n" on each header line.
REQUEST_LINE_OVERHEAD = len("  HTTP/1.1\r\n")
HEADER_LINE_OVERHEAD = len(": \r\n")


def head_bytes(scope: Scope) -> int:
    """The size of a request's request line and headers, as near as the ASGI scope tells."""
    target = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    line = len(scope["method"]) + len(target) + len(query) + 1 + REQUEST_LINE_OVERHEAD
    return line + sum(len(n) + len(v) + HEADER_LINE_OVERHEAD for n, v in scope["headers"])


class RequestHeadLimit:
    """Answers 431 `headers_too_large` to a request whose head is over `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_bytes(scope) > self.limit:
            message = f"the request line and headers may be at most {self.limit} bytes in all"
            await error_response(431, "headers_too_large", message)(scope, receive, send)
            return
        await self.app(scope, receive, send)
