"""The daemon's own small HTTP server: `/metrics`, `/healthz` and `/readyz`.

(`timerd api` and `timerd run` serve the same three routes from the API's port.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from timerd.errors import StoreUnavailable
from timerd.store import Store


async def _metrics(_: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, REGISTRY)  # the scrape reads the store
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _readyz(store: Store) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def readyz(_: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(store.ping)
        except StoreUnavailable:
            return web.json_response({"status": "store unavailable"}, status=503)
        return web.json_response({"status": "ready"})

    return readyz


async def start_probe_server(store: Store, host: str, port: int) -> web.AppRunner:
    """Serve the three routes on `host:port` until the returned runner is cleaned up."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(store))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
