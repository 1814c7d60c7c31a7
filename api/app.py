"""The Starlette application: validate, insert, read and cancel. It never fires timers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Authenticator
from api.console import Console
from api.contract import BATCH_MAX, BatchAnswer, BatchResult, TimerPage, encode
from api.errors import EXCEPTION_HANDLERS, ApiError, error_object, log
from api.limits import RequestHeadLimit
from api.openapi import openapi_route
from api.series import (
    change_schedule,
    first_occurrence,
    is_series_request,
    parse_schedule,
    refuse_series_fields,
)
from api.stats import StatsCache
from api.validation import (
    MAX_BODY_BYTES,
    SERIES_FIELDS,
    TIME_FIELDS,
    URL_SCAN,
    Rules,
    json_object,
    parse_batch,
    parse_changes,
    parse_create,
    parse_idempotency_key,
    parse_json_object,
    parse_list_query,
    request_hash,
)
from api.views import timer_view
from timerd import metrics
from timerd.clock import Clock, StoreClock, SystemClock, read_store_clock
from timerd.errors import StoreUnavailable, TimerNotFound, TimerStateConflict
from timerd.models import State, Timer, TimerChanges, new_timer_id
from timerd.schedules import parse_stored
from timerd.settings import Settings
from timerd.store import Store

InsertListener = Callable[[Timer], None]


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:  # the ASGI messages themselves: Request.stream() costs a create 3 % more
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body may be at most {limit} bytes")


class TimerRoutes:
    """The route handlers, bound to one store, clock and settings.

    Handlers that touch the store are plain functions (Starlette runs them in its thread pool);
    `create` reads the body asynchronously and hands the blocking part to the pool.
    """

    def __init__(
        self, settings: Settings, store: Store, clock: Clock, on_insert: InsertListener | None
    ) -> None:
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.store = store
        self.clock = clock
        self.on_insert = on_insert
        self.auth = Authenticator(settings, store)
        self.cap = PendingCap(store, settings.max_pending_per_tenant)
        self.stats_cache = StatsCache(store)

    def _tenant(self, request: Request) -> str:
        return self.auth.tenant(request.headers.get("authorization"))

    def _announce(self, timer: Timer) -> None:
        if self.on_insert is not None:
            self.on_insert(timer)

    async def timers(self, request: Request) -> Response:
        """POST creates, GET lists: one route, so that a 405 there allows both."""
        if request.method == "POST":
            return await self.create(request)
        return await run_in_threadpool(self.list_timers, request)

    async def _tenant_async(self, request: Request) -> str:
        """The caller's tenant, on the loop when no store read is needed (see `api.auth`)."""
        tenant = self.auth.tenant_without_store()
        if tenant is None:
            tenant = await run_in_threadpool(self._tenant, request)
        return tenant

    async def create(self, request: Request) -> Response:
        """`POST /timers`: validate, insert durably, answer 201 (or the original timer when an
        `Idempotency-Key` was seen before with the same body). Nothing here waits in a thread:
        the insert awaits the store's group commit (`Store.insert_many_async`)."""
        tenant = await self._tenant_async(request)
        data = parse_json_object(await read_body(request, self.settings.max_body_bytes))
        idempotency_key = parse_idempotency_key(request.headers.get("idempotency-key"))
        now_ms = self.clock.now_ms()
        timer = self._new_timer(data, now_ms, tenant, idempotency_key)
        [outcome] = await self._store_new(tenant, [timer])
        if isinstance(outcome, ApiError):
            raise outcome
        stored, replayed = outcome
        headers = {"Location": f"/timers/{stored.id}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return answer(timer_view(stored, now_ms), 201, headers)

    async def create_batch(self, request: Request) -> Response:
        """`POST /timers/batch`: a JSON array of up to BATCH_MAX create bodies, each checked
        exactly as `POST /timers` checks one (an `idempotency_key` field stands for the
        header); the valid ones are stored in one transaction. Answers 200 with one result per
        item, in order: 201 and the timer, or the status and error a single create would have
        answered."""
        tenant = await self._tenant_async(request)
        if request.headers.get("idempotency-key") is not None:
            raise ApiError(
                400,
                "invalid_idempotency_key",
                "a batch takes an idempotency_key in each item, not the Idempotency-Key header",
            )
        limit = self.settings.max_body_bytes * BATCH_MAX
        items = parse_batch(await read_body(request, limit))
        now_ms = self.clock.now_ms()
        checked: list[Timer | ApiError] = []
        for item in items:
            try:
                checked.append(self._batch_timer(item, tenant, now_ms))
            except ApiError as exc:
                checked.append(exc)
        timers = [t for t in checked if isinstance(t, Timer)]
        stored = iter(await self._store_new(tenant, timers))
        results: list[BatchResult] = []
        for item in checked:
            outcome = item if isinstance(item, ApiError) else next(stored)
            results.append(batch_result(outcome, now_ms))
        return answer(BatchAnswer(results), 200)

    def _batch_timer(self, item: Any, tenant: str, now_ms: int) -> Timer:
        """The timer one batch item asks for, or the ApiError a single create would raise."""
        data = dict(json_object(item))
        key = parse_idempotency_key(data.pop("idempotency_key", None), "idempotency_key")
        return self._new_timer(data, now_ms, tenant, key)

    def _new_timer(
        self, data: dict[str, Any], now_ms: int, tenant: str, idempotency_key: str | None
    ) -> Timer:
        """The timer a create body asks `tenant` for: a one-off, or a series at its first
        occurrence; with the digest of the body when it comes with an idempotency key."""
        if not is_series_request(data):
            refuse_series_fields(data)
            spec = parse_create(data, now_ms, self.rules)
            schedule_text, occurrence, occurrence_at_ms = None, 0, None
        else:
            schedule, first = parse_schedule(data, now_ms, self.rules)
            spec = parse_create(data, now_ms, self.rules, due_at_ms=first)
            schedule_text, occurrence, occurrence_at_ms = schedule.to_json(), 1, first
        return Timer(
            id=new_timer_id(),
            url=spec.url,
            due_at_ms=spec.due_at_ms,
            created_at_ms=now_ms,
            payload=spec.payload,
            headers=spec.headers,
            max_attempts=spec.max_attempts,
            schedule=schedule_text,
            occurrence=occurrence,
            occurrence_at_ms=occurrence_at_ms,
            on_failure_url=spec.on_failure_url,
            tenant=tenant,
            idempotency_key=idempotency_key,
            request_hash=request_hash(data) if idempotency_key else None,
        )

    async def _store_new(self, tenant: str, timers: list[Timer]) -> list[Stored | ApiError]:
        """Insert `timers` of `tenant` in one durable write, under the tenant's cap. For each,
        in order: (the stored timer, whether it is an idempotent replay), or the ApiError of a
        single create (429 past the cap, 422 for a key reused with another body). A retry of a
        create that succeeded gets the original timer even when the tenant is at its cap now."""
        earlier: dict[str, Timer] = {}
        if any(t.idempotency_key is not None for t in timers):
            earlier = await run_in_threadpool(self._earlier, tenant, timers)
        fresh = [t for t in timers if t.idempotency_key not in earlier]
        allowed = fresh[: await self.cap.room(tenant)]
        stored = await self.store.insert_many_async(allowed) if allowed else []
        inserted = {t.id: s for t, s in zip(allowed, stored, strict=True)}
        outcomes: list[Stored | ApiError] = []
        for timer in timers:
            if timer.idempotency_key in earlier:
                outcomes.append(replay(timer, earlier[timer.idempotency_key]))
            elif timer.id in inserted:
                outcomes.append(self._inserted(timer, inserted[timer.id]))
            else:
                outcomes.append(self.cap.refusal())
        return outcomes

    def _earlier(self, tenant: str, timers: list[Timer]) -> dict[str, Timer]:
        """The tenant's timers already created with the idempotency keys of `timers`."""
        found = {}
        for key in {t.idempotency_key for t in timers if t.idempotency_key is not None}:
            timer = self.store.find_by_idempotency_key(tenant, key)
            if timer is not None:
                found[key] = timer
        return found

    def _inserted(self, timer: Timer, stored: Timer) -> Stored | ApiError:
        """What inserting `timer` came to: new, or a concurrent create's under the same key."""
        if stored.id != timer.id:
            return replay(timer, stored)
        self.cap.added(timer.tenant)
        metrics.TIMERS_CREATED.inc()
        self._announce(stored)
        return stored, False

    async def timer(self, request: Request) -> Response:
        """GET reads, PATCH changes, DELETE cancels: one route, so a 405 there allows all."""
        if request.method == "PATCH":
            return await self.change(request)
        return await run_in_threadpool(self.read_or_cancel, request)

    def read_or_cancel(self, request: Request) -> Response:
        """`GET /timers/{id}` reads a timer; `DELETE /timers/{id}` cancels a pending one."""
        tenant = self._tenant(request)
        timer_id = request.path_params["timer_id"]
        now_ms = self.clock.now_ms()
        if request.method == "DELETE":
            timer = self.store.cancel(timer_id, now_ms, tenant)
        else:
            timer = self.store.get(timer_id, tenant)
        return answer(timer_view(timer, now_ms))

    async def change(self, request: Request) -> Response:
        """`PATCH /timers/{id}`: move or edit a pending timer, or change a pending or paused
        series (its schedule too: it carries on at the new schedule's next occurrence); 409
        once it is claimed."""
        tenant = await run_in_threadpool(self._tenant, request)
        data = parse_json_object(await read_body(request, self.settings.max_body_bytes))
        now_ms = self.clock.now_ms()
        timer_id = request.path_params["timer_id"]
        changes = await run_in_threadpool(self._changes, timer_id, tenant, data, now_ms)
        timer = await run_in_threadpool(self.store.update_pending, timer_id, changes, tenant)
        if changes.due_at_ms is not None:
            self._announce(timer)
        return answer(timer_view(timer, now_ms))

    def _changes(
        self, timer_id: str, tenant: str, data: dict[str, Any], now_ms: int
    ) -> TimerChanges:
        """The changes a PATCH body asks of the timer: a series' schedule fields and a
        one-off's time fields are each refused on the other kind."""
        asked = set(data)
        if not asked & (SERIES_FIELDS | TIME_FIELDS):
            return parse_changes(data, now_ms, self.rules)
        current = self.store.get(timer_id, tenant)
        if current.schedule is None:
            stray = sorted(asked & (SERIES_FIELDS - {"timezone"}))
            if stray:
                raise ApiError(
                    422,
                    "invalid_field",
                    f"{stray[0]} belongs to a series; this timer is a one-off",
                    field=stray[0],
                )
            return parse_changes(data, now_ms, self.rules)
        if not asked & SERIES_FIELDS:
            field = sorted(asked & TIME_FIELDS)[0]
            raise ApiError(422, "invalid_field", "a series is timed by its schedule", field=field)
        schedule, first = change_schedule(current.schedule, data, now_ms, self.rules)
        return parse_changes(data, now_ms, self.rules, schedule=(schedule.to_json(), first))

    def pause(self, request: Request) -> Response:
        """`POST /timers/{id}/pause`: a pending series stops until resumed."""
        tenant = self._tenant(request)
        timer = self.store.pause(request.path_params["timer_id"], tenant)
        return answer(timer_view(timer, self.clock.now_ms()))

    def resume(self, request: Request) -> Response:
        """`POST /timers/{id}/resume`: a paused series carries on at its next occurrence from
        now; the occurrences it missed while paused are not fired."""
        tenant = self._tenant(request)
        timer_id = request.path_params["timer_id"]
        now_ms = self.clock.now_ms()
        current = self.store.get(timer_id, tenant)
        if current.schedule is None:
            raise TimerNotFound(timer_id)
        schedule = parse_stored(current.schedule)
        try:
            due_at_ms = first_occurrence(schedule, now_ms, self.rules)
        except ApiError as exc:
            if current.state is not State.PAUSED:  # say what matters more: it is not paused
                raise TimerStateConflict(timer_id, current.state.value) from exc
            raise
        timer = self.store.resume(timer_id, due_at_ms, tenant)
        self._announce(timer)
        return answer(timer_view(timer, now_ms))

    def list_timers(self, request: Request) -> Response:
        """`GET /timers?state=failed&limit=50&cursor=<id>`: newest first, one page at a time;
        with `url_prefix`, each page scans at most `URL_SCAN` timers."""
        tenant = self._tenant(request)
        query = parse_list_query(request.query_params)
        if query.url_prefix is None:
            timers = self.store.list_timers(
                query.state, query.cursor, query.limit, tenant, query.recurring
            )
            cursor = timers[-1].id if len(timers) == query.limit else None
        else:
            timers, cursor = self.store.list_timers_by_url(
                query.url_prefix,
                query.state,
                query.cursor,
                query.limit,
                tenant=tenant,
                scan=URL_SCAN,
            )
            if query.recurring is not None:  # the scan's cursor still says where to go on
                timers = [t for t in timers if (t.schedule is not None) == query.recurring]
        now_ms = self.clock.now_ms()
        return answer(TimerPage([timer_view(t, now_ms) for t in timers], cursor))

    def stats(self, request: Request) -> JSONResponse:
        """`GET /stats`: the caller's tenant at a glance (see `api.stats`)."""
        tenant = self._tenant(request)
        return JSONResponse(self.stats_cache.get(tenant, self.clock.now_ms()))

    def replay(self, request: Request) -> Response:
        """`POST /timers/{id}/replay`: a failed or fired timer fires again now, same id."""
        tenant = self._tenant(request)
        now_ms = self.clock.now_ms()
        timer = self.store.replay(request.path_params["timer_id"], now_ms, tenant)
        self._announce(timer)
        return answer(timer_view(timer, now_ms))

    def readyz(self, _: Request) -> JSONResponse:
        """200 while the store answers, 503 otherwise."""
        try:
            self.store.ping()
        except StoreUnavailable:
            return JSONResponse({"status": "store unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})


class PendingCap:
    """The per-tenant cap on pending timers, counted at most once a second per tenant (so it
    holds to within the creates of one second on each replica)."""

    REFRESH_S = 1.0

    def __init__(self, store: Store, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._counts: dict[str, tuple[int, float]] = {}  # tenant → (pending, counted at)
        self._lock = threading.Lock()

    async def room(self, tenant: str) -> int:
        """How many more pending timers `tenant` may have now; counts them in a worker thread
        only when the last count is over REFRESH_S old. One request counts; those that come
        meanwhile go by the last count instead of counting too."""
        now = time.monotonic()
        with self._lock:
            count, at = self._counts.get(tenant, (0, -math.inf))
            counting = now - at > self.REFRESH_S
            if counting:
                self._counts[tenant] = (count, now)
        if not counting:
            return max(0, self._limit - count)
        try:
            count = await run_in_threadpool(self._store.count_pending, tenant, self._limit)
        except BaseException:
            with self._lock:  # the next request counts again
                self._counts[tenant] = (self._counts[tenant][0], at)
            raise
        with self._lock:
            self._counts[tenant] = (count, now)
        return max(0, self._limit - count)

    def refusal(self) -> ApiError:
        """The 429 of a create past the cap."""
        return ApiError(
            429,
            "too_many_pending",
            f"this tenant already has {self._limit} pending timers",
            headers={"Retry-After": "60"},
        )

    def added(self, tenant: str) -> None:
        """Count a timer just inserted for `tenant` until the next refresh."""
        with self._lock:
            count, at = self._counts.get(tenant, (0, -math.inf))
            self._counts[tenant] = (count + 1, at)


Stored = tuple[Timer, bool]  # a stored timer, and whether it answers an idempotent replay


def replay(timer: Timer, earlier: Timer) -> Stored | ApiError:
    """The answer to `timer` whose idempotency key `earlier` already has: `earlier`, unless
    it was created from another body."""
    if earlier.request_hash != timer.request_hash:
        return ApiError(
            422,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request body",
        )
    return earlier, True


def answer(model: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer of an `api.contract` model, encoded by msgspec."""
    return Response(encode(model), status, headers, media_type="application/json")


def batch_result(outcome: Stored | ApiError, now_ms: int) -> BatchResult:
    """One item of a batch answer."""
    if isinstance(outcome, ApiError):
        return BatchResult(status=outcome.status, error=error_object(outcome))
    stored, replayed = outcome
    return BatchResult(status=201, timer=timer_view(stored, now_ms), replayed=replayed)


async def healthz(_: Request) -> JSONResponse:
    """Answers while the process runs."""
    return JSONResponse({"status": "ok"})


def metrics_page(_: Request) -> Response:
    """Prometheus metrics of this process (it reads the store's backlog: runs in a thread)."""
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})


CLOCK_READ_S = 10.0  # how often each replica reads the store's clock


def store_clock_lifespan(
    clock: StoreClock, store: Store
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Keep `clock` corrected to the store's while the app runs, so that a replica whose clock
    is off still computes due times (`"seconds": 10`) on the clock the daemons judge by."""

    async def read_once() -> None:
        try:
            await read_store_clock(clock, lambda: run_in_threadpool(store.server_time_ms))
        except StoreUnavailable as exc:
            log.warning("store_clock_unavailable", error=str(exc))
        if not clock.trusted and clock.synced:
            log.error("clock_offset", offset_ms=clock.offset_ms)

    async def read_forever() -> None:
        while True:
            await asyncio.sleep(CLOCK_READ_S)
            await read_once()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await read_once()  # before the first request
        reader = asyncio.create_task(read_forever())
        try:
            yield
        finally:
            reader.cancel()

    return lifespan


def create_app(
    settings: Settings,
    store: Store,
    *,
    clock: Clock | None = None,
    on_insert: InsertListener | None = None,
) -> Starlette:
    """Build the API over an open store. `on_insert` hears of every created timer (the
    in-process daemon of `timerd run` uses it to wake up for timers due soon). Without a
    `clock` the app reads the store's clock and judges time by it."""
    lifespan = None
    if clock is None:
        clock = StoreClock(SystemClock(), int(settings.max_clock_offset_s * 1000))
        lifespan = store_clock_lifespan(clock, store)
    routes = TimerRoutes(settings, store, clock, on_insert)
    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
            Route("/openapi.json", openapi_route(settings), methods=["GET"]),
            Route("/timers", routes.timers, methods=["GET", "POST"]),
            Route("/timers/batch", routes.create_batch, methods=["POST"]),
            Route("/timers/{timer_id}/replay", routes.replay, methods=["POST"]),
            Route("/timers/{timer_id}/pause", routes.pause, methods=["POST"]),
            Route("/timers/{timer_id}/resume", routes.resume, methods=["POST"]),
            Route("/timers/{timer_id}", routes.timer, methods=["GET", "PATCH", "DELETE"]),
            Route("/stats", routes.stats, methods=["GET"]),
            *Console().routes(),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(RequestMetrics),
            Middleware(RequestHeadLimit, limit=settings.max_request_head_bytes),
        ],
    )
    # Starlette answers `/timers/` with a 307 to a URL built from the request's Host header:
    # a redirect anyone can aim anywhere. Every path is exact; others are a JSON 404.
    app.router.redirect_slashes = False
    return app


class RequestMetrics:
    """Counts every answered request by route template, method and status. The labelled child
    counter of each (route, method, status) is looked up once and kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counters: dict[tuple[str, str, int], Any] = {}

    def _count(self, path: str, method: str, status: int) -> None:
        key = (path, method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = metrics.API_REQUESTS.labels(path, method, str(status))
        counter.inc()

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
            self._count(getattr(scope.get("route"), "path", "unmatched"), scope["method"], status)
