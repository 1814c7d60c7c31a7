"""The faults of issue 9, one at a time, with an injected clock and store: each test makes the
fault happen at the call where it hurts and checks what must hold after it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from api import create_app
from tests.support.mongomock_compat import mongomock_client
from tests.support.offload import inline
from tests.test_daemon import (
    START_MS,
    FakeClock,
    Recorder,
    add_timer,
    leading,
    run,
    settings,
    settle,
    supervised,
)
from timerd.daemon import Counters, Daemon
from timerd.delivery import Attempt
from timerd.errors import DaemonCrashed, StoreUnavailable, TimerNotFound
from timerd.models import Claim, State, Timer, new_claim_token, new_timer_id
from timerd.outcomes import judge
from timerd.retry import RetryPolicy
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.base import Store
from timerd.store.mongo import MongoStore

IDLE = Counters(inflight=0, host_slots=0, parked=0, outcomes_queued=0, unsettled_claims=0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    yield s
    s.close()


class Lossy:
    """A real store, but its claims may apply and then raise (as a MongoDB batch does when the
    connection drops before the answer), come back late (a stall), and its outcome writes may
    raise what `fail_completes_with` says."""

    def __init__(self, inner: Store, clock: FakeClock | None = None) -> None:
        self.inner = inner
        self.clock = clock
        self.fail_claims = 0
        self.claim_delay_ms = 0
        self.fail_completes_with: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def claim_due(self, ids: list[str], claim: Claim) -> list[Timer]:
        claimed = self.inner.claim_due(ids, claim)
        if self.clock is not None:
            self.clock.advance(self.claim_delay_ms)  # the answer comes back this much later
        if self.fail_claims:
            self.fail_claims -= 1
            raise StoreUnavailable("claim applied, answer lost (injected)")
        return claimed

    def complete(self, outcomes: Any) -> int:
        if self.fail_completes_with is not None:
            raise self.fail_completes_with
        return self.inner.complete(outcomes)


def daemon_over(lossy: Lossy, clock: Any, recorder: Recorder, **overrides: Any) -> Daemon:
    return Daemon(settings(**overrides), lossy, recorder, clock=clock, holder="d")  # type: ignore[arg-type]


def test_a_failed_claim_gives_back_its_host_slots_and_its_claims(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    lossy = Lossy(store)
    lossy.fail_claims = 1
    ids = [add_timer(store, START_MS + i) for i in range(4)]  # one host
    clock.advance(10)

    async def scenario() -> None:
        async with leading(lossy, clock, recorder, per_host_concurrency=4) as daemon:
            assert await daemon.step_or_back_off() > 0  # the claim applied, then raised
            assert {store.get(i).state for i in ids} == {State.FIRING}
            assert daemon.counters() == Counters(0, 0, 0, 0, unsettled_claims=1)
            await daemon.step()  # gives the claim back, polls, claims and fires
            await daemon.step()
            await settle(daemon)
            assert daemon.counters() == IDLE

    run(scenario)
    assert sorted(recorder.ids) == sorted(ids)
    assert {(store.get(i).state, store.get(i).attempts) for i in ids} == {(State.FIRED, 1)}


def test_a_claim_that_comes_back_too_late_is_released_not_fired(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    lossy = Lossy(store, clock)
    timer_id = add_timer(store, START_MS)
    s = settings()
    lossy.claim_delay_ms = int(s.lease_ttl_s * 1000) + 1  # stalled past a lease

    async def scenario() -> None:
        async with leading(lossy, clock, recorder) as daemon:
            await daemon.step()
            assert recorder.delivered == []
            assert daemon.counters() == Counters(0, 0, 0, 0, unsettled_claims=1)
            await daemon.step()
            assert (store.get(timer_id).state, store.get(timer_id).attempts) == (State.PENDING, 0)
            lossy.claim_delay_ms = 0
            await daemon.lease.tick()
            await daemon.step()  # released, polled again
            await daemon.step()
            await settle(daemon)
            assert daemon.counters() == IDLE

    run(scenario)
    assert recorder.ids == [timer_id]
    fired = store.get(timer_id)
    assert (fired.state, fired.attempts, len(fired.history)) == (State.FIRED, 1, 1)


class Raising(Recorder):
    """A deliverer that raises what `error` says."""

    def __init__(self, clock: FakeClock, error: Exception) -> None:
        super().__init__(clock)
        self.error = error

    async def __call__(self, timer: Timer) -> Any:
        self.delivered.append(timer)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [UnicodeError("label too long"), ValueError("bad"), RuntimeError("?"), KeyError("k")],
    ids=lambda e: type(e).__name__,
)
def test_a_delivery_that_raises_is_a_recorded_failed_attempt(
    store: Store, error: Exception
) -> None:
    clock = FakeClock()
    recorder = Raising(clock, error)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(store, clock, recorder, retry_schedule="1s") as daemon:
            await daemon.step()
            await settle(daemon)
            first = store.get(timer_id)
            assert (first.state, first.last_error) == (State.PENDING, type(error).__name__)
            clock.ms = first.due_at_ms
            daemon.window.poll_soon()
            await daemon.lease.tick()
            await daemon.step()
            await daemon.step()
            await settle(daemon)
            assert daemon.counters() == IDLE

    run(scenario)
    failed = store.get(timer_id)
    assert (failed.state, failed.attempts) == (State.FAILED, 2)  # the budget holds
    assert [r.error for r in failed.history] == [type(error).__name__] * 2


def test_an_unexpected_store_error_ends_the_daemon_loudly(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    lossy = Lossy(store)
    lossy.fail_completes_with = RuntimeError("a bug in the adapter")
    add_timer(store, START_MS)

    async def scenario() -> None:
        daemon = Daemon(settings(), lossy, recorder, clock=clock, holder="d", offload=inline)  # type: ignore[arg-type]
        with structlog.testing.capture_logs() as logs, pytest.raises(DaemonCrashed) as crash:
            await asyncio.wait_for(daemon.run(), timeout=10)
        cause = crash.value.__cause__
        assert isinstance(cause, ExceptionGroup)
        bugs = cause.subgroup(RuntimeError)
        assert bugs is not None and str(bugs.exceptions[0]) == "a bug in the adapter"
        assert any(e["event"] == "daemon_crashed" and e.get("exc_info") for e in logs)

    run(scenario)


def test_outcome_errors_that_mean_try_again_are_retried_until_written(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    lossy = Lossy(store)
    lossy.fail_completes_with = StoreUnavailable("write concern timeout (injected)")
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(lossy, clock, recorder) as daemon:
            await daemon.step()
            await daemon.deliveries.settled()
            for _ in range(3):
                await asyncio.sleep(0.01)
                assert daemon.counters().outcomes_queued == 1
            lossy.fail_completes_with = None
            await settle(daemon)
            assert daemon.counters() == IDLE

    run(scenario)
    assert store.get(timer_id).state is State.FIRED


def mongo_store_with_clock(true_clock: FakeClock) -> MongoStore:
    return MongoStore(mongomock_client(), "timerd", server_time=true_clock.now_ms)


class SkewedClock:
    """A host clock `skew_ms` off the true one."""

    def __init__(self, true_clock: FakeClock, skew_ms: int) -> None:
        self.true_clock = true_clock
        self.skew_ms = skew_ms

    def now_ms(self) -> int:
        return self.true_clock.ms + self.skew_ms

    def monotonic_s(self) -> float:
        return self.true_clock.monotonic_s()


@pytest.mark.parametrize("skew_ms", [-30_000, 30_000])
def test_a_skewed_daemon_neither_fires_early_nor_sweeps_a_live_claim(skew_ms: int) -> None:
    true_clock = FakeClock()
    recorder = Recorder(true_clock)
    mongo = mongo_store_with_clock(true_clock)
    due = add_timer(mongo, START_MS + 2_000)
    live = add_timer(mongo, START_MS)
    claim = Claim("other", START_MS, START_MS + 10_000, new_claim_token())  # live 10 s more
    assert len(mongo.claim_due([live], claim)) == 1

    async def scenario() -> None:
        clock = SkewedClock(true_clock, skew_ms)
        daemon = Daemon(settings(), mongo, recorder, clock=clock, holder="skewed")  # type: ignore[arg-type]
        async with supervised(daemon):
            await daemon.lease.tick()
            assert daemon.lease.is_leader()
            assert abs(daemon.clock.offset_ms + skew_ms) <= 1
            for _ in range(19):  # up to 1 ms before the due time
                true_clock.advance(100)
                await daemon.recover_expired()
                await daemon.step()
            true_clock.advance(99)
            await daemon.step()
            assert recorder.delivered == []
            true_clock.advance(1)
            await daemon.step()
            await settle(daemon)

    run(scenario)
    assert recorder.ids == [due]
    assert mongo.get(live).state is State.FIRING and mongo.get(live).claimed_by == "other"


def test_a_daemon_whose_clock_is_off_by_more_than_the_bound_refuses_to_lead() -> None:
    true_clock = FakeClock()
    recorder = Recorder(true_clock)
    mongo = mongo_store_with_clock(true_clock)
    add_timer(mongo, START_MS)

    async def scenario() -> None:
        clock = SkewedClock(true_clock, 120_000)
        daemon = Daemon(settings(), mongo, recorder, clock=clock, holder="far")  # type: ignore[arg-type]
        with structlog.testing.capture_logs() as logs:
            async with supervised(daemon):
                await daemon.lease.tick()
                assert not daemon.lease.is_leader()
                await daemon.step()
        refusals = [e for e in logs if e["event"] == "clock_offset_refuses_leadership"]
        assert refusals and refusals[0]["log_level"] == "error"
        assert abs(refusals[0]["offset_ms"] + 120_000) <= 1

    run(scenario)
    assert recorder.delivered == []
    assert mongo.leases() == []


def test_a_leader_whose_clock_drifts_out_of_bounds_gives_the_lease_up() -> None:
    true_clock = FakeClock()
    recorder = Recorder(true_clock)
    mongo = mongo_store_with_clock(true_clock)

    async def scenario() -> None:
        clock = SkewedClock(true_clock, 0)
        daemon = Daemon(settings(), mongo, recorder, clock=clock, holder="drifts")  # type: ignore[arg-type]
        async with supervised(daemon):
            await daemon.lease.tick()
            assert daemon.lease.is_leader()
            clock.skew_ms = 61_000
            await daemon.read_store_clock()
            await daemon.lease.tick()
            assert not daemon.lease.is_leader()

    run(scenario)
    leases = mongo.leases()
    assert leases and {lease.expires_at_ms for lease in leases} == {0}  # released at once


def test_a_stale_leaders_outcome_is_rejected_after_the_sweep_and_a_new_claim(
    store: Store,
) -> None:
    timer_id = add_timer(store, START_MS)
    old = Claim("old", START_MS, START_MS + 1_000, new_claim_token())
    [stale] = store.claim_due([timer_id], old)
    clock = FakeClock()
    clock.advance(1_001)  # the old leader stalled past its claim
    recorder = Recorder(clock, status=503)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            await daemon.recover_expired()
            await daemon.step()
            await daemon.step()
            await daemon.deliveries.settled()
            # the old leader wakes up and reports its delivery, too late
            delivered = Attempt(clock.now_ms(), 1.0, status=200)
            late = judge(stale, delivered, daemon.retry, clock.now_ms())
            assert store.complete([late]) == 0
            await settle(daemon)

    run(scenario)
    timer = store.get(timer_id)
    assert (timer.state, timer.last_status, timer.attempts) == (State.PENDING, 503, 2)


def test_new_claim_tokens_are_unique() -> None:
    assert len({new_claim_token() for _ in range(1000)}) == 1000
    assert new_timer_id() != new_claim_token()


@pytest.mark.parametrize("skew_ms", [-30_000, 30_000])
def test_an_api_replica_computes_due_times_on_the_stores_clock(skew_ms: int) -> None:
    def store_ms() -> int:  # the store's clock is `skew_ms` away from this host's
        return time.time_ns() // 1_000_000 + skew_ms

    mongo = MongoStore(mongomock_client(), "timerd", server_time=store_ms)
    app = create_app(Settings(auth="none"), mongo)

    async def create() -> httpx.Response:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
        ):
            return await client.post("/timers", json={"seconds": 10, "url": "https://r.example/h"})

    before_ms = store_ms()
    answer = asyncio.run(create())
    after_ms = store_ms()
    assert answer.status_code == 201, answer.text
    due_at_ms = mongo.get(answer.json()["id"]).due_at_ms
    assert before_ms + 10_000 - 5 <= due_at_ms <= after_ms + 10_000 + 5


def finished_long_ago(store: Store, finished_ms: int) -> str:
    timer_id = add_timer(store, finished_ms)
    claim = Claim("old", finished_ms, finished_ms + 1_000, new_claim_token())
    [claimed] = store.claim_due([timer_id], claim)
    delivered = Attempt(finished_ms, 1.0, status=200)
    assert store.complete([judge(claimed, delivered, RetryPolicy((1.0,)), finished_ms)]) == 1
    return timer_id


def test_the_leader_deletes_finished_timers_once_their_retention_is_over(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    day_ms = 86_400_000
    old = [finished_long_ago(store, START_MS - day_ms - 1_000 - i) for i in range(3)]
    recent = finished_long_ago(store, START_MS - day_ms + 1_000)
    pending = add_timer(store, START_MS + 60_000)

    async def scenario() -> None:
        async with leading(store, clock, recorder, retention="1d") as daemon:
            await daemon.purge_finished()

    run(scenario)
    for timer_id in old:
        with pytest.raises(TimerNotFound):
            store.get(timer_id)
    assert store.get(recent).state is State.FIRED
    assert store.get(pending).state is State.PENDING


def test_retention_forever_keeps_every_timer(store: Store) -> None:
    clock = FakeClock()
    old = finished_long_ago(store, START_MS - 10 * 365 * 86_400_000)

    async def scenario() -> None:
        async with leading(store, clock, Recorder(clock), retention="forever") as daemon:
            await daemon.purge_finished()

    run(scenario)
    assert store.get(old).state is State.FIRED
