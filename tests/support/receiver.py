"""A real webhook receiver on 127.0.0.1 with a random port, running in its own thread.

It records every request (path, headers, body, arrival time) and answers with what `respond`
returns for it: a status (200 by default), or an `Answer` with response headers too, with
`body` as the answer's body (none by default). Tests wait on it with `wait_for`, never with
sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict


@dataclass(frozen=True)
class Arrival:
    """One request as the receiver saw it."""

    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at_ms: int

    @property
    def timer_id(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Answer:
    """A status with response headers (a name may repeat, as `Set-Cookie` does)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()


Respond = Callable[[Arrival], int | Answer]


class Receiver:
    """Start with `with Receiver() as r:`; `r.url` is the base URL to give timers."""

    def __init__(
        self,
        respond: Respond | None = None,
        delay_s: float = 0.0,
        host: str = "127.0.0.1",
        body: bytes = b"",
    ) -> None:
        self.respond = respond or (lambda _: 200)
        self.body = body  # what every answer carries
        self.delay_s = delay_s  # how long each answer takes, to keep deliveries in flight
        self.arrivals: list[Arrival] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.host = host  # the name in `url`; it listens on 127.0.0.1 whatever the name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks"

    def __enter__(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        arrival = Arrival(
            path=request.path,
            query=request.query_string,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
            at_ms=time.time_ns() // 1_000_000,
        )
        answer = self.respond(arrival)
        if isinstance(answer, int):
            answer = Answer(answer)
        status = answer.status
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        headers = list(answer.headers)
        if 300 <= status < 400:
            headers.append(("location", "/hooks/redirected"))
        return web.Response(status=status, headers=CIMultiDict(headers), body=self.body or None)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Arrival]:
        """Block until at least `count` requests arrived; fail the test after `timeout_s`."""
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self.arrivals) >= count, timeout_s)
            arrivals = list(self.arrivals)
        assert ok, f"expected {count} webhook(s) within {timeout_s}s, got {len(arrivals)}"
        return arrivals
