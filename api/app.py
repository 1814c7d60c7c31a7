"""The Starlette application: validate, insert, read and cancel. It never fires timers."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import EXCEPTION_HANDLERS, ApiError
from api.validation import MAX_BODY_BYTES, parse_create, parse_json_object, parse_list_query
from api.views import timer_view
from timerd import metrics
from timerd.clock import Clock, SystemClock
from timerd.errors import StoreUnavailable
from timerd.models import Timer, new_timer_id
from timerd.settings import Settings
from timerd.ssrf import AddressPolicy
from timerd.store import Store

InsertListener = Callable[[Timer], None]


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body may be at most {limit} bytes")


class TimerRoutes:
    """The route handlers, bound to one store, clock and settings."""

    def __init__(
        self, settings: Settings, store: Store, clock: Clock, on_insert: InsertListener | None
    ) -> None:
        self.settings = settings
        self.address_policy = AddressPolicy.from_setting(settings.allowed_networks)  # url hosts
        self.store = store
        self.clock = clock
        self.on_insert = on_insert

    async def create(self, request: Request) -> JSONResponse:
        data = parse_json_object(await read_body(request))
        now_ms = self.clock.now_ms()
        spec = parse_create(data, now_ms, self.settings.max_delay_s, policy=self.address_policy)
        timer = Timer(
            id=new_timer_id(),
            url=spec.url,
            due_at_ms=spec.due_at_ms,
            created_at_ms=now_ms,
            payload=spec.payload,
            headers=spec.headers,
            max_attempts=spec.max_attempts,
        )
        await run_in_threadpool(self.store.insert, timer)
        metrics.TIMERS_CREATED.inc()
        if self.on_insert is not None:
            self.on_insert(timer)
        headers = {"Location": f"/timers/{timer.id}"}
        return JSONResponse(timer_view(timer, now_ms), status_code=201, headers=headers)

    def readyz(self, _: Request) -> JSONResponse:
        """200 while the store answers, 503 otherwise."""
        try:
            self.store.ping()
        except StoreUnavailable:
            return JSONResponse({"status": "store unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    def timer(self, request: Request) -> JSONResponse:
        """GET reads, DELETE cancels: one route, so that a 405 there allows both."""
        return self.cancel(request) if request.method == "DELETE" else self.get(request)

    def get(self, request: Request) -> JSONResponse:
        timer = self.store.get(request.path_params["timer_id"])
        return JSONResponse(timer_view(timer, self.clock.now_ms()))

    async def timers(self, request: Request) -> JSONResponse:
        """POST creates, GET lists: one route, so that a 405 there allows both."""
        if request.method == "POST":
            return await self.create(request)
        return await run_in_threadpool(self.list_timers, request)

    def list_timers(self, request: Request) -> JSONResponse:
        """`GET /timers?state=failed&limit=50&cursor=<id>`: newest first, one page at a time."""
        query = parse_list_query(request.query_params)
        timers = self.store.list_timers(query.state, query.cursor, query.limit)
        now_ms = self.clock.now_ms()
        full = len(timers) == query.limit
        return JSONResponse(
            {
                "timers": [timer_view(t, now_ms) for t in timers],
                "next_cursor": timers[-1].id if full else None,
            }
        )

    def replay(self, request: Request) -> JSONResponse:
        """`POST /timers/{id}/replay`: a failed or fired timer fires again now, same id."""
        now_ms = self.clock.now_ms()
        timer = self.store.replay(request.path_params["timer_id"], now_ms)
        if self.on_insert is not None:
            self.on_insert(timer)
        return JSONResponse(timer_view(timer, now_ms))

    def cancel(self, request: Request) -> JSONResponse:
        now_ms = self.clock.now_ms()
        timer = self.store.cancel(request.path_params["timer_id"], now_ms)
        return JSONResponse(timer_view(timer, now_ms))


async def healthz(_: Request) -> JSONResponse:
    """Answers while the process runs."""
    return JSONResponse({"status": "ok"})


def metrics_page(_: Request) -> Response:
    """Prometheus metrics of this process (it reads the store's backlog: runs in a thread)."""
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})


def create_app(
    settings: Settings,
    store: Store,
    *,
    clock: Clock | None = None,
    on_insert: InsertListener | None = None,
) -> Starlette:
    """Build the API over an open store. `on_insert` hears of every created timer (the
    in-process daemon of `timerd run` uses it to wake up for timers due soon)."""
    routes = TimerRoutes(settings, store, clock or SystemClock(), on_insert)
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
            Route("/timers", routes.timers, methods=["GET", "POST"]),
            Route("/timers/{timer_id}/replay", routes.replay, methods=["POST"]),
            Route("/timers/{timer_id}", routes.timer, methods=["GET", "DELETE"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(RequestMetrics)],
    )


class RequestMetrics:
    """Counts every answered request by route template, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.API_REQUESTS.labels(path, scope["method"], str(status)).inc()
