"""Delivery robustness: hostile receivers cost one bounded attempt, signatures verify with the
reference `standardwebhooks` package, client headers and payload arrive, one bad receiver cannot
slow the others, and retries never fire early or pile up.

The hostile receivers are raw asyncio servers on 127.0.0.1 (random ports) that speak just enough
HTTP to misbehave; each connection they serve is bounded in time. The last two tests run real
`timerd api` and `timerd daemon` processes on a temporary SQLite file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import secrets
import threading
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.timers import timer_for
from tests.support.waiting import wait_until
from timerd.delivery import Attempt, Deliverer
from timerd.models import State, Timer
from timerd.settings import Settings
from timerd.store import open_store

LOOPBACK = "127.0.0.1"
LOOPBACK_ALLOWED = "127.0.0.0/8"  # webhooks may reach loopback, where every receiver here is
CONNECTION_BOUND_S = 15.0  # no hostile connection outlives this, whatever the client does
TIMEOUT_S = 1.0  # delivery_timeout_s of the Deliverer facing the hostile receivers
MARGIN_S = 0.5  # an attempt returns within its timeout plus this
MEMORY_BOUND = 4 * 1024 * 1024  # traced peak of one attempt against a 50 MB / endless body
HUGE_BODY = 50 * 1024 * 1024
CHUNK = b"x" * 65536
TRICKLED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"  # sent one byte per 100 ms


# -- raw loopback servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request a raw server read."""

    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at_ms: int  # wall clock when it had been read

    @property
    def timer_id(self) -> str:
        return self.target.split("?")[0].rsplit("/", 1)[-1]


@dataclass
class Connection:
    """One connection a raw server accepted, as the server saw it."""

    requests: list[Request] = field(default_factory=list)
    sent: int = 0  # bytes handed to the socket
    client_left: bool = False  # the client closed or reset the connection
    opened_s: float = field(default_factory=time.monotonic)
    closed_s: float | None = None


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Connection], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 with a random port, in the running event loop. Every connection
    runs `behaviour`, which may raise `ConnectionError` or hit EOF when the client goes away; it
    is cut off after `CONNECTION_BOUND_S` in any case."""

    def __init__(self, behaviour: Behaviour, host: str = LOOPBACK) -> None:
        self.behaviour = behaviour
        self.host = host
        self.connections: list[Connection] = []
        self.changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.open_now = 0
        self.most_open = 0  # most connections open at once

    def url(self, path: str = "/hooks") -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection()
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        async with self.changed:
            self.connections.append(conn)
            self.changed.notify_all()
        try:
            await asyncio.wait_for(self.behaviour(reader, writer, conn), CONNECTION_BOUND_S)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.client_left = True
        except TimeoutError:
            pass  # the bound: the test that relied on the client leaving will say so
        finally:
            conn.closed_s = time.monotonic()
            self.open_now -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)
            async with self.changed:
                self.changed.notify_all()

    async def wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait (bounded) until `check()` holds for the connections seen so far."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(check), timeout_s)
            except TimeoutError:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


async def read_request(reader: asyncio.StreamReader, conn: Connection) -> Request:
    """Read one request (head and Content-Length body); raise IncompleteReadError at EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    request = Request(target, headers, body, now_ms())
    conn.requests.append(request)
    return request


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def send(writer: asyncio.StreamWriter, conn: Connection, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    conn.sent += len(data)


async def wait_for_eof(reader: asyncio.StreamReader) -> None:
    """Read (and drop) until the client closes; raise IncompleteReadError then."""
    while await reader.read(65536):
        pass
    raise asyncio.IncompleteReadError(b"", None)


async def huge_body(reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection) -> None:
    await read_request(reader, c)
    await send(w, c, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE_BODY)
    while c.sent < HUGE_BODY:
        await send(w, c, CHUNK)


async def endless_chunked(
    reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
) -> None:
    await read_request(reader, c)
    await send(w, c, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while True:
        await send(w, c, b"%x\r\n%b\r\n" % (len(CHUNK), CHUNK))


async def trickle(reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection) -> None:
    """The whole answer, status line included, one byte every 100 ms."""
    await read_request(reader, c)
    for byte in TRICKLED:
        await send(w, c, bytes([byte]))
        await asyncio.sleep(0.1)
    await wait_for_eof(reader)


async def trickle_body(
    reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
) -> None:
    """A prompt status line and headers, then a 1000-byte body one byte every 100 ms."""
    await read_request(reader, c)
    await send(w, c, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    while True:
        await send(w, c, b"x")
        await asyncio.sleep(0.1)


async def redirect_loop(
    reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
) -> None:
    """302 to the very URL asked for, on every request of a keep-alive connection."""
    while True:
        request = await read_request(reader, c)
        location = f"http://{request.headers['host']}{request.target}"
        await send(
            w,
            c,
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode(),
        )


async def endless_headers(
    reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
) -> None:
    """A status line, then header lines for ever, as fast as the client takes them."""
    await read_request(reader, c)
    await send(w, c, b"HTTP/1.1 200 OK\r\n")
    n = 0
    while True:
        await send(w, c, b"x-filler-%d: %b\r\n" % (n, b"a" * 100))
        n += 1


async def stalled_headers(
    reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
) -> None:
    """A status line and half a header, then silence until the client leaves."""
    await read_request(reader, c)
    await send(w, c, b"HTTP/1.1 200 OK\r\nx-never-ends: ")
    await wait_for_eof(reader)


# -- 1. hostile receivers against Deliverer.deliver ---------------------------------------------


@dataclass(frozen=True)
class Run:
    """One attempt against a hostile receiver: its outcome, how long it took, the traced memory
    peak while it ran, and the connections as the receiver saw them."""

    attempt: Attempt
    elapsed_s: float
    peak_bytes: int
    connections: list[Connection]


async def answer_204(reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection) -> None:
    """A healthy receiver: 204 to every request of a keep-alive connection."""
    while True:
        await read_request(reader, c)
        await send(w, c, b"HTTP/1.1 204 No Content\r\n\r\n")


async def attempt_against(behaviour: Behaviour, *, client_must_leave: bool) -> Run:
    """One `deliver` against a raw server, measuring its duration and traced memory peak.

    With `client_must_leave`, wait (bounded) for the server to see the client go away while the
    Deliverer's session is still open: the attempt itself dropped the connection. Then the same
    Deliverer, allowed a single connection in all, must still deliver to a healthy receiver:
    the hostile attempt left nothing behind that holds its one slot."""
    settings = Settings(
        allowed_networks=LOOPBACK_ALLOWED,
        delivery_timeout_s=TIMEOUT_S,
        connect_timeout_s=TIMEOUT_S,
        concurrency=1,
        per_host_concurrency=1,
    )
    async with (
        RawServer(behaviour) as server,
        RawServer(answer_204) as healthy,
        Deliverer(settings) as deliverer,
    ):
        timer = timer_for(server.url())
        tracemalloc.start()
        try:
            started = time.monotonic()
            attempt = await deliverer.deliver(timer)
            elapsed_s = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        if client_must_leave:
            await server.wait(
                lambda: all(c.client_left for c in server.connections),
                5,
                "the receiver to see the client leave",
            )
        after = await deliverer.deliver(timer_for(healthy.url()))
        assert (after.status, after.error) == (204, None), "the Deliverer is stuck"
        return Run(attempt, elapsed_s, peak, list(server.connections))


@pytest.mark.parametrize("behaviour", [huge_body, endless_chunked], ids=["50MB", "endless"])
def test_a_huge_or_endless_body_is_cut_off_after_a_short_prefix(behaviour: Behaviour) -> None:
    run = asyncio.run(attempt_against(behaviour, client_must_leave=True))
    assert (run.attempt.status, run.attempt.error) == (200, None)
    assert run.attempt.response is not None and set(run.attempt.response) == {"x"}
    assert run.elapsed_s < TIMEOUT_S + MARGIN_S
    [conn] = run.connections
    assert conn.client_left and conn.sent < HUGE_BODY / 2
    assert run.peak_bytes < MEMORY_BOUND, f"traced peak {run.peak_bytes} bytes"


def test_a_trickled_answer_times_out_in_one_bounded_attempt() -> None:
    run = asyncio.run(attempt_against(trickle, client_must_leave=True))
    assert (run.attempt.status, run.attempt.error) == (None, "timeout")
    assert TIMEOUT_S - 0.05 <= run.elapsed_s < TIMEOUT_S + MARGIN_S
    [conn] = run.connections
    assert conn.client_left and conn.sent < len(TRICKLED)  # ~10 bytes in 1 s


def test_a_trickled_body_is_not_waited_for() -> None:
    run = asyncio.run(attempt_against(trickle_body, client_must_leave=True))
    assert run.attempt.status == 200 and run.attempt.error is None
    assert run.elapsed_s < TIMEOUT_S + MARGIN_S
    [conn] = run.connections
    assert conn.client_left


def test_a_redirect_loop_is_one_request_not_followed() -> None:
    run = asyncio.run(attempt_against(redirect_loop, client_must_leave=False))
    assert (run.attempt.status, run.attempt.error, run.attempt.delivered) == (302, None, False)
    assert run.elapsed_s < TIMEOUT_S + MARGIN_S
    assert [len(c.requests) for c in run.connections] == [1]


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [(endless_headers, "ClientResponseError"), (stalled_headers, "timeout")],
    ids=["endless", "stalled"],
)
def test_headers_that_never_end_cost_one_bounded_attempt(behaviour: Behaviour, error: str) -> None:
    run = asyncio.run(attempt_against(behaviour, client_must_leave=True))
    assert (run.attempt.status, run.attempt.error) == (None, error)
    assert run.elapsed_s < TIMEOUT_S + MARGIN_S
    assert [len(c.requests) for c in run.connections] == [1]
    assert run.peak_bytes < MEMORY_BOUND, f"traced peak {run.peak_bytes} bytes"


# -- 2. signed webhooks, verified with the reference package ------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


PAYLOADS: list[Any] = [
    None,
    {"order": 42, "ok": True},
    {"greeting": "grüße, 日本語, שלום, 🎉", "quote": 'he said "hi"\n'},
    ["ünïcödé", 1.5, None],
    "just a string with a \u2028 line separator",
]


async def deliver_all(settings: Settings, timers: list[Timer]) -> list[Attempt]:
    async with Deliverer(settings) as deliverer:
        return list(await asyncio.gather(*(deliverer.deliver(t) for t in timers)))


def test_signed_webhooks_verify_with_each_rotated_secret() -> None:
    first, second, stranger = new_secret(), new_secret(), new_secret()
    settings = Settings(allowed_networks=LOOPBACK_ALLOWED, signing_secret=f"{first} {second}")
    with Receiver() as receiver:
        timers = [
            timer_for(receiver.url, payload=None if p is None else canonical(p)) for p in PAYLOADS
        ]
        attempts = asyncio.run(deliver_all(settings, timers))
        arrivals = receiver.wait_for(len(timers))
    assert all(a.delivered for a in attempts)
    assert sorted(a.timer_id for a in arrivals) == sorted(t.id for t in timers)
    payloads = {t.id: p for t, p in zip(timers, PAYLOADS, strict=True)}
    for arrival in arrivals:
        body = json.loads(arrival.body)
        assert arrival.headers["webhook-id"] == arrival.timer_id
        assert len(arrival.headers["webhook-signature"].split(" ")) == 2
        for secret in (first, second):
            assert Webhook(secret).verify(arrival.body, arrival.headers) == body
        with pytest.raises(WebhookVerificationError):
            Webhook(stranger).verify(arrival.body, arrival.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(first).verify(arrival.body.replace(b'"id"', b'"Id"'), arrival.headers)
        expected = payloads[arrival.timer_id]
        assert body.get("payload") == expected and ("payload" in body) == (expected is not None)
    non_ascii = next(a for a in arrivals if payloads[a.timer_id] == PAYLOADS[2])
    assert "日本語".encode() in non_ascii.body  # sent as UTF-8, not \u escapes


def test_without_a_secret_there_is_no_signature_header() -> None:
    with Receiver() as receiver:
        timer = timer_for(receiver.url, payload=canonical(PAYLOADS[2]))
        [attempt] = asyncio.run(deliver_all(Settings(allowed_networks=LOOPBACK_ALLOWED), [timer]))
        [arrival] = receiver.wait_for(1)
    assert attempt.delivered
    assert "webhook-signature" not in arrival.headers
    assert {"webhook-id", "webhook-timestamp"} <= set(arrival.headers)


# -- 3. client headers and payload ---------------------------------------------------------------


def test_client_headers_and_payload_arrive() -> None:
    payload = {"invoice": "INV-7", "amount": 12.5, "note": "café"}
    with Receiver() as receiver:
        timer = timer_for(receiver.url, headers=(("x-tenant", "acme"),), payload=canonical(payload))
        [attempt] = asyncio.run(deliver_all(Settings(allowed_networks=LOOPBACK_ALLOWED), [timer]))
        [arrival] = receiver.wait_for(1)
    assert attempt.delivered
    assert arrival.headers["x-tenant"] == "acme"
    assert arrival.headers["webhook-id"] == timer.id
    assert arrival.headers["content-type"] == "application/json"
    body = json.loads(arrival.body)
    assert body["payload"] == payload
    assert (body["id"], body["type"]) == (timer.id, "timer.fired")


# -- real processes: one bad receiver, retries -------------------------------------------------


class ServerThread:
    """A `RawServer` served by an event loop in a background thread, for tests that block."""

    def __init__(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: RawServer | None = None

    def __enter__(self) -> RawServer:
        self._thread.start()
        self.server = self._run(RawServer(self._behaviour).start())
        return self.server

    def __exit__(self, *_: object) -> None:
        assert self.server is not None
        self._run(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: Awaitable[RawServer | None]) -> Any:
        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)


async def hang(reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection) -> None:
    """Read the request, then never answer: wait for the client to give up."""
    await read_request(reader, c)
    await wait_for_eof(reader)


@dataclass
class Script:
    """A receiver's answers by attempt (the last repeats), and what it saw, by timer id."""

    answers: list[int]
    hold_s: float  # how long each answer is held back: keeps an attempt in flight
    arrivals: dict[str, list[Request]] = field(default_factory=lambda: defaultdict(list))
    inflight: Counter[str] = field(default_factory=Counter)
    most_inflight: int = 0  # most attempts of one timer in flight at once

    async def behaviour(
        self, reader: asyncio.StreamReader, w: asyncio.StreamWriter, c: Connection
    ) -> None:
        while True:  # keep-alive: any number of requests per connection
            request = await read_request(reader, c)
            timer_id = request.timer_id
            seen = self.arrivals[timer_id]
            seen.append(request)
            status = self.answers[min(len(seen), len(self.answers)) - 1]
            self.inflight[timer_id] += 1
            self.most_inflight = max(self.most_inflight, self.inflight[timer_id])
            try:
                await asyncio.sleep(self.hold_s)
                await send(w, c, b"HTTP/1.1 %d Scripted\r\nContent-Length: 0\r\n\r\n" % status)
            finally:
                self.inflight[timer_id] -= 1


POLL_S = 0.5
FAST = {
    "TIMERD_LEASE_TTL_S": "2",
    "TIMERD_LEASE_RENEW_S": "0.5",
    "TIMERD_POLL_INTERVAL_S": str(POLL_S),
    "TIMERD_CONNECT_TIMEOUT_S": "1",
    "TIMERD_DELIVERY_TIMEOUT_S": "2",
    "TIMERD_DRAIN_GRACE_S": "5",
    "TIMERD_ALLOWED_NETWORKS": LOOPBACK_ALLOWED,
}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'timerd.db'}"


def start_api_and_daemon(
    procs: TimerdProcesses, db_url: str, env: dict[str, str]
) -> tuple[TimerdProcess, TimerdProcess]:
    """`timerd api` and `timerd daemon` on one store; return once the daemon holds the lease."""
    api = procs.start("api", db_url, env=env)
    daemon = procs.start("daemon", db_url, env=env, ready=False)
    wait_until(lambda: lease_holder_pid(db_url) == daemon.pid, 10, "the daemon to take the lease")
    return api, daemon


def lease_holder_pid(db_url: str) -> int | None:
    store = open_store(db_url)
    try:
        lease = store.get_lease("p0")
    finally:
        store.close()
    if lease is None or lease.expires_at_ms <= now_ms():
        return None
    return int(lease.holder.split(":")[1])


def stored(db_url: str, ids: list[str]) -> dict[str, Timer]:
    store = open_store(db_url)
    try:
        return {i: store.get(i) for i in ids}
    finally:
        store.close()


def count_in(db_url: str, ids: list[str], state: State) -> int:
    return sum(t.state is state for t in stored(db_url, ids).values())


def rfc3339(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def create_all(api: TimerdProcess, plan: list[tuple[str, int]], **extra: Any) -> list[str]:
    """Create one timer per (url, due_at_ms), with the `extra` fields, over one keep-alive
    connection; return their ids."""
    ids = []
    with httpx.Client(base_url=api.base_url) as client:
        for url, due_at_ms in plan:
            body = {"url": url, "fire_at": rfc3339(due_at_ms), **extra}
            answer = client.post("/timers", json=body)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
    return ids


HANGING = HEALTHY = 40
CONCURRENCY, PER_HOST = 32, 16  # PER_HOST < CONCURRENCY < HANGING: see the test's docstring
SPACING_MS = 10
LEAD_MS = 2000
ON_TIME_MS = 500  # healthy lateness bound: generous, but far below a delivery timeout


def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    procs: TimerdProcesses, db_url: str
) -> None:
    """40 timers at a receiver that never answers, 40 at a healthy one, interleaved 10 ms apart.

    With the global limit alone the hanging timers would take all 32 slots within a third of a
    second and the healthy ones due after that would wait ~2 s for the first timeouts; the
    per-host limit (16 per host:port) keeps 16 slots for the healthy receiver. The two receivers
    differ by port, which is enough: the per-host limit counts `host:port`.

    The hanging host itself must still serve its timers in due order while it is saturated:
    each first attempt waits at most for the waves of attempts due before it."""
    env = FAST | {
        "TIMERD_CONCURRENCY": str(CONCURRENCY),
        "TIMERD_PER_HOST_CONCURRENCY": str(PER_HOST),
        "TIMERD_RETRY_SCHEDULE": "1s",
    }
    api, daemon = start_api_and_daemon(procs, db_url, env)
    with ServerThread(hang) as hanging, Receiver() as healthy:
        first_due_ms = now_ms() + LEAD_MS
        plan = []
        for i in range(HANGING + HEALTHY):
            url = hanging.url() if i % 2 == 0 else healthy.url
            plan.append((url, first_due_ms + SPACING_MS * i))
        ids = create_all(api, plan)
        created_ms = now_ms()
        assert created_ms < first_due_ms - 2 * POLL_S * 1000, "creating the timers took too long"
        due = {i: due_ms for i, (_, due_ms) in zip(ids, plan, strict=True)}
        bad, good = ids[0::2], ids[1::2]
        healthy.wait_for(HEALTHY, timeout_s=10)
        wait_until(lambda: count_in(db_url, good, State.FIRED) == HEALTHY, 10, "healthy fired")
        wait_until(
            lambda: count_in(db_url, bad, State.FAILED) == HANGING,
            30,
            "every hanging timer to fail after its retry",
        )
        connections = list(hanging.connections)
        most_open = hanging.most_open
        arrivals = list(healthy.arrivals)
    assert daemon.running()

    assert sorted(a.timer_id for a in arrivals) == sorted(good), "lost or repeated"
    lateness = {a.timer_id: a.at_ms - due[a.timer_id] for a in arrivals}
    late = sorted(lateness.values())
    assert late[0] >= 0, f"fired early: {late}"
    assert late[-1] < ON_TIME_MS, f"healthy timers were late (ms): {late}"

    # Each hanging timer: two bounded attempts, 2 s each, the retry ~1 s after the timeout.
    seen: dict[str, list[int]] = defaultdict(list)
    for conn in connections:
        assert len(conn.requests) == 1 and conn.client_left
        assert 1.9 <= conn.closed_s - conn.opened_s < 3.5  # type: ignore[operator]
        seen[conn.requests[0].timer_id].append(conn.requests[0].at_ms)
    assert sorted(seen) == sorted(bad)
    assert {len(times) for times in seen.values()} == {2}, "not exactly one retry each"
    for timer_id, (first, second) in seen.items():
        assert first >= due[timer_id], "fired early"
        assert second - first >= 2000 + 900 - 100, "retried early"
    # Due order at the saturated host: a first attempt (due before any retry) waits at most
    # for the full waves of PER_HOST attempts due before it, each one timeout long.
    waves_ahead = (HANGING - 1) // PER_HOST
    first_late = sorted(seen[i][0] - due[i] for i in bad)
    assert first_late[-1] < waves_ahead * 2000 + 1000, f"first attempts late (ms): {first_late}"
    # +1: the receiver may accept the next connection just before it reads the EOF of the one
    # the daemon closed a moment earlier.
    assert most_open <= PER_HOST + 1
    for timer in stored(db_url, bad).values():
        assert (timer.attempts, [r.error for r in timer.history]) == (2, ["timeout", "timeout"])
    assert all(t.attempts == 1 for t in stored(db_url, good).values())


def test_retries_never_fire_early_and_never_pile_up(procs: TimerdProcesses, db_url: str) -> None:
    """Each timer is answered 503, 503, then 200, with `1s,1s` as the retry schedule. Every
    attempt carries the same webhook-id, the client's header and payload, and its number."""
    env = FAST | {"TIMERD_RETRY_SCHEDULE": "1s,1s"}
    api, daemon = start_api_and_daemon(procs, db_url, env)
    script = Script(answers=[503, 503, 200], hold_s=0.1)
    payload = {"order": 7, "note": "überall ✓"}
    with ServerThread(script.behaviour) as receiver:
        first_due_ms = now_ms() + 1500
        plan = [(receiver.url(), first_due_ms + 20 * i) for i in range(10)]
        ids = create_all(api, plan, payload=payload, headers={"x-tenant": "acme"})
        wait_until(lambda: count_in(db_url, ids, State.FIRED) == len(ids), 15, "all fired")
        arrivals = {i: list(script.arrivals[i]) for i in ids}
        most_inflight = script.most_inflight
    assert daemon.running()
    due = {i: due_ms for i, (_, due_ms) in zip(ids, plan, strict=True)}
    for timer_id, requests in arrivals.items():
        assert len(requests) == 3, f"{timer_id} arrived {len(requests)} times"
        times = [r.at_ms for r in requests]
        assert times[0] >= due[timer_id], "fired early"
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(900 <= gap < 3000 for gap in gaps), f"gaps between attempts (ms): {gaps}"
        for number, request in enumerate(requests, 1):
            body = json.loads(request.body)
            assert request.headers["webhook-id"] == timer_id
            assert request.headers["x-tenant"] == "acme"
            assert (body["id"], body["attempt"], body["payload"]) == (timer_id, number, payload)
    assert most_inflight == 1
    for timer in stored(db_url, ids).values():
        assert (timer.state, timer.attempts, timer.last_status) == (State.FIRED, 3, 200)
        assert [r.status for r in timer.history] == [503, 503, 200]
