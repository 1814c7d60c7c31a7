"""The daemon's loop, one step at a time, with an injected clock and a recording deliverer.

No real time passes: the tests move the clock and call `step()`, the hot path, directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from timerd.daemon import Daemon
from timerd.delivery import Attempt
from timerd.errors import StoreUnavailable
from timerd.models import Claim, State, Timer, TimerChanges, new_timer_id
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.base import Store

START_MS = 1_800_000_000_000


class FakeClock:
    """A clock the test moves by hand; wall and monotonic time move together."""

    def __init__(self) -> None:
        self.ms = START_MS

    def now_ms(self) -> int:
        return self.ms

    def monotonic_s(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


class Recorder:
    """A deliverer that records each timer; answers `status` (with `retry_after` when set), or
    waits for `gate` first."""

    def __init__(self, clock: FakeClock, status: int | None = 200) -> None:
        self.clock = clock
        self.status = status
        self.retry_after: str | None = None
        self.delivered: list[Timer] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, timer: Timer) -> Attempt:
        self.delivered.append(timer)
        if self.gate is not None:
            await self.gate.wait()
        return Attempt(
            started_at_ms=self.clock.now_ms(),
            latency_ms=0.5,
            status=self.status,
            error=None if self.status else "ClientConnectorError",
            retry_after=self.retry_after,
        )

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.delivered]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    yield s
    s.close()


def add_timer(store: Store, due_at_ms: int) -> str:
    timer_id = new_timer_id()
    store.insert(
        Timer(id=timer_id, url="http://127.0.0.1:9/h", due_at_ms=due_at_ms, created_at_ms=START_MS)
    )
    return timer_id


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"poll_interval_s": 1.0, "lookahead_s": 5.0, "lease_ttl_s": 10.0}
    return Settings(**(base | overrides))


@asynccontextmanager
async def supervised(daemon: Daemon) -> AsyncIterator[Daemon]:
    """What `run` sets up around the hot path: a task group for deliveries, the store's clock
    read, and the outcome writer running; the test then drives `step` by hand."""
    async with asyncio.TaskGroup() as tasks:
        daemon.attach(tasks)
        await daemon.read_store_clock()
        writer = tasks.create_task(daemon.outcomes.run())
        try:
            yield daemon
        finally:
            writer.cancel()


@asynccontextmanager
async def leading(
    store: Store, clock: FakeClock, recorder: Recorder, **overrides: Any
) -> AsyncIterator[Daemon]:
    """A daemon that holds the lease, with its outcome writer running."""
    daemon = Daemon(settings(**overrides), store, recorder, clock=clock, holder="daemon-a")
    async with supervised(daemon):
        await daemon.lease.tick()
        assert daemon.lease.is_leader()
        yield daemon


async def settle(daemon: Daemon) -> None:
    """Let started deliveries finish and their outcomes reach the store."""
    await daemon.deliveries.settled()
    await daemon.outcomes.drained()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_fires_at_the_due_instant_and_never_before(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    timer_id = add_timer(store, START_MS + 2_500)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            assert await daemon.step() == pytest.approx(1.0)  # next poll comes before the due time
            clock.advance(1_000)
            assert await daemon.step() == pytest.approx(1.0)
            clock.advance(1_499)
            assert await daemon.step() == pytest.approx(0.001)  # sleeps exactly to the due instant
            assert recorder.delivered == []
            clock.advance(1)
            assert await daemon.step() == 0.0
            await settle(daemon)

    run(scenario)
    assert recorder.ids == [timer_id]
    fired = store.get(timer_id)
    assert (fired.state, fired.fired_at_ms, fired.attempts) == (State.FIRED, START_MS + 2_500, 1)
    assert fired.claimed_by is None and fired.last_status == 200


def test_overdue_backlog_drains_in_due_order_within_the_batch_bound(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    ids = [add_timer(store, START_MS - 1_000 + i) for i in range(25)]

    async def scenario() -> None:
        async with leading(store, clock, recorder, batch_size=10) as daemon:
            for _ in range(3):
                await daemon.step()
                assert len(daemon.window) <= 10  # never more than one batch in memory
                await daemon.step()
                await settle(daemon)

    run(scenario)
    assert recorder.ids == ids


def test_concurrency_limit_holds_back_claims_until_slots_free(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    recorder.gate = asyncio.Event()
    ids = [add_timer(store, START_MS + i) for i in range(5)]
    clock.advance(10)

    async def scenario() -> None:
        async with leading(store, clock, recorder, concurrency=2) as daemon:
            assert recorder.gate is not None
            await daemon.step()
            await daemon.step()
            await asyncio.sleep(0)
            assert recorder.ids == ids[:2]
            assert [store.get(i).state for i in ids] == [State.FIRING] * 2 + [State.PENDING] * 3
            recorder.gate.set()
            await settle(daemon)
            for _ in range(4):
                await daemon.step()
                await settle(daemon)

    run(scenario)
    assert recorder.ids == ids
    assert {store.get(i).state for i in ids} == {State.FIRED}


def test_a_timer_cancelled_after_it_was_read_is_not_fired(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    timer_id = add_timer(store, START_MS + 500)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            await daemon.step()
            assert len(daemon.window)  # read, not claimed
            store.cancel(timer_id, clock.now_ms())
            clock.advance(500)
            await daemon.step()
            await settle(daemon)

    run(scenario)
    assert recorder.delivered == []
    assert store.get(timer_id).state is State.CANCELLED


def test_a_standby_never_claims(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    add_timer(store, START_MS)
    for partition in range(store.partitions()):  # another daemon holds every partition
        lease = store.acquire_lease(f"p{partition}", "someone-else", 10_000, clock.now_ms())
        assert lease is not None

    async def scenario() -> None:
        daemon = Daemon(settings(), store, recorder, clock=clock, holder="daemon-b")
        async with supervised(daemon):
            await daemon.lease.tick()
            assert not daemon.lease.is_leader()
            assert await daemon.step() == pytest.approx(1.0)

    run(scenario)
    assert recorder.delivered == []


def test_a_leader_that_cannot_renew_stops_claiming_before_its_lease_expires(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    timer_id = add_timer(store, START_MS + 8_000)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            clock.advance(7_600)  # past 3/4 of the 10 s TTL without a renewal
            assert not daemon.lease.is_leader()
            clock.advance(400)
            await daemon.step()
            await settle(daemon)

    run(scenario)
    assert recorder.delivered == []
    assert store.get(timer_id).state is State.PENDING


async def attempt_once(daemon: Daemon, clock: FakeClock, store: Store, timer_id: str) -> Timer:
    """Move the clock to the timer's due time, fire it once, and return it as stored after."""
    clock.ms = max(clock.ms, store.get(timer_id).due_at_ms)
    await daemon.lease.tick()  # renew, as the housekeeping schedule would have meanwhile
    daemon.window.poll_soon()
    await daemon.step()
    await daemon.step()
    await settle(daemon)
    return store.get(timer_id)


def test_a_retryable_failure_is_retried_on_the_schedule_until_it_succeeds(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock, status=503)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(store, clock, recorder, retry_schedule="10s,1m") as daemon:
            first = await attempt_once(daemon, clock, store, timer_id)
            assert (first.state, first.attempts, first.last_status) == (State.PENDING, 1, 503)
            assert START_MS + 9_000 <= first.due_at_ms <= START_MS + 11_000  # 10 s ± 10 %
            recorder.status = None  # connection refused: retryable too
            second = await attempt_once(daemon, clock, store, timer_id)
            assert second.state is State.PENDING
            assert first.due_at_ms + 54_000 <= second.due_at_ms <= first.due_at_ms + 66_000
            recorder.status = 200
            third = await attempt_once(daemon, clock, store, timer_id)
            assert (third.state, third.attempts, third.fired_at_ms) == (
                State.FIRED,
                3,
                second.due_at_ms,
            )
            assert [(r.attempt, r.status, r.error) for r in third.history] == [
                (1, 503, None),
                (2, None, "ClientConnectorError"),
                (3, 200, None),
            ]

    run(scenario)
    assert [t.id for t in recorder.delivered] == [timer_id] * 3
    assert {t.id for t in recorder.delivered} == {timer_id}  # the same webhook-id every time


def test_the_retry_budget_ends_in_failed(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock, status=500)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(store, clock, recorder, retry_schedule="1s,1s") as daemon:
            states = [(await attempt_once(daemon, clock, store, timer_id)).state for _ in range(3)]
            assert states == [State.PENDING, State.PENDING, State.FAILED]

    run(scenario)
    failed = store.get(timer_id)
    assert (failed.state, failed.attempts, failed.last_status, failed.fired_at_ms) == (
        State.FAILED,
        3,
        500,
        None,
    )


@pytest.mark.parametrize("status", [400, 404, 410, 422])
def test_a_permanent_answer_fails_at_once(store: Store, status: int) -> None:
    clock = FakeClock()
    recorder = Recorder(clock, status=status)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            failed = await attempt_once(daemon, clock, store, timer_id)
            assert (failed.state, failed.attempts, failed.last_status) == (
                State.FAILED,
                1,
                status,
            )

    run(scenario)


def test_retry_after_is_honoured_within_bounds(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock, status=429)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        async with leading(store, clock, recorder, retry_schedule="5s,5s,5s") as daemon:
            recorder.retry_after = "120"
            first = await attempt_once(daemon, clock, store, timer_id)
            assert first.due_at_ms == clock.now_ms() + 120_000
            recorder.retry_after = "999999999"  # capped at a day
            second = await attempt_once(daemon, clock, store, timer_id)
            assert second.due_at_ms == clock.now_ms() + 86_400_000

    run(scenario)


def test_a_timer_may_carry_its_own_attempt_budget(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock, status=500)
    timer_id = new_timer_id()
    store.insert(
        Timer(
            id=timer_id,
            url="http://127.0.0.1:9/h",
            due_at_ms=START_MS,
            created_at_ms=START_MS,
            max_attempts=1,
        )
    )

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            assert (await attempt_once(daemon, clock, store, timer_id)).state is State.FAILED

    run(scenario)


def test_a_busy_host_does_not_hold_back_another(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    recorder.gate = asyncio.Event()
    slow = [new_timer_id() for _ in range(4)]
    for timer_id in slow:
        store.insert(
            Timer(id=timer_id, url="http://slow.test/h", due_at_ms=START_MS, created_at_ms=START_MS)
        )
    fast = add_timer(store, START_MS + 1)
    clock.advance(1)

    async def scenario() -> None:
        async with leading(store, clock, recorder, per_host_concurrency=2) as daemon:
            assert recorder.gate is not None
            await daemon.step()
            await daemon.step()
            await asyncio.sleep(0)
            assert sorted(recorder.ids) == sorted([*slow[:2], fast])
            assert [store.get(i).state for i in slow[2:]] == [State.PENDING] * 2  # not claimed
            recorder.gate.set()
            for _ in range(3):
                await settle(daemon)
                await daemon.step()
            await settle(daemon)

    run(scenario)
    assert sorted(recorder.ids) == sorted([*slow, fast])


def test_a_timer_announced_by_the_api_fires_without_waiting_for_a_poll(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            assert await daemon.step() == pytest.approx(1.0)
            timer_id = add_timer(store, START_MS + 300)
            daemon.notify_insert(store.get(timer_id))
            await asyncio.sleep(0)  # the announcement is handed over through the event loop
            assert await daemon.step() == pytest.approx(0.3)
            clock.advance(300)
            await daemon.step()
            await settle(daemon)
            assert recorder.ids == [timer_id]

    run(scenario)


def test_expired_claims_of_a_dead_owner_are_recovered_and_fired(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    timer_id = add_timer(store, START_MS)
    dead = Claim("dead", now_ms=START_MS, until_ms=START_MS + 1_000, token="dead")
    assert [t.id for t in store.claim_due([timer_id], dead)] == [timer_id]
    clock.advance(1_001)

    async def scenario() -> None:
        async with leading(store, clock, recorder) as daemon:
            await daemon.recover_expired()
            await daemon.step()
            await daemon.step()
            await settle(daemon)

    run(scenario)
    assert recorder.ids == [timer_id]
    recovered = store.get(timer_id)
    assert (recovered.state, recovered.attempts) == (State.FIRED, 2)
    assert [(r.attempt, r.error) for r in recovered.history] == [(1, "claim_expired"), (2, None)]


class FlakyStore:
    """Wraps a store; `down` makes every call raise StoreUnavailable."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("down for the test")
            return attr(*args, **kwargs)

        return call


def test_store_outage_backs_off_then_resumes(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    flaky = FlakyStore(store)
    timer_id = add_timer(store, START_MS)

    async def scenario() -> None:
        daemon = Daemon(settings(), flaky, recorder, clock=clock, holder="d")  # type: ignore[arg-type]
        async with supervised(daemon):
            await daemon.lease.tick()
            flaky.down = True
            delays = [await daemon.step_or_back_off() for _ in range(3)]
            assert all(delay > 0 for delay in delays)  # backs off
            flaky.down = False
            await daemon.step_or_back_off()
            await daemon.step_or_back_off()
            await settle(daemon)

    run(scenario)
    assert recorder.ids == [timer_id]
    assert store.get(timer_id).state is State.FIRED


def test_one_hosts_backlog_does_not_hide_another_hosts_timers(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    recorder.gate = asyncio.Event()
    for i in range(40):  # more overdue timers for one host than a batch (10) holds
        store.insert(
            Timer(
                id=new_timer_id(),
                url="http://slow.test/h",
                due_at_ms=START_MS - 1000 + i,
                created_at_ms=START_MS,
            )
        )
    other = add_timer(store, START_MS)

    async def scenario() -> None:
        settings_ = {"batch_size": 10, "per_host_concurrency": 2}
        async with leading(store, clock, recorder, **settings_) as daemon:
            for _ in range(4):
                await daemon.step()
                daemon.window.poll_soon()
            await asyncio.sleep(0)
            assert other in recorder.ids
            assert len(recorder.ids) == 3  # two of the slow host's, and the other one
            assert recorder.gate is not None
            recorder.gate.set()
            await settle(daemon)

    run(scenario)


def test_a_timer_both_polled_and_announced_is_fired_once_and_frees_its_slot(store: Store) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    timer_id = add_timer(store, START_MS + 100)

    async def scenario() -> None:
        async with leading(store, clock, recorder, per_host_concurrency=2) as daemon:
            await daemon.step()  # polled into the window
            daemon.notify_insert(store.get(timer_id))  # and announced as well
            await asyncio.sleep(0)
            clock.advance(100)
            await daemon.step()
            await settle(daemon)
            assert recorder.ids == [timer_id]
            recorder.gate = asyncio.Event()  # hold the next deliveries in flight
            later = [add_timer(store, START_MS + 200) for _ in range(2)]
            daemon.window.poll_soon()
            clock.advance(100)
            await daemon.step()
            await asyncio.sleep(0)
            assert sorted(recorder.ids[1:]) == sorted(later)  # both of the host's slots free
            recorder.gate.set()
            await settle(daemon)

    run(scenario)


def test_a_url_changed_after_the_poll_gives_its_slot_back_to_the_host_it_took(
    store: Store,
) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    moved = add_timer(store, START_MS + 100)  # on 127.0.0.1:9

    async def scenario() -> None:
        async with leading(store, clock, recorder, per_host_concurrency=1) as daemon:
            await daemon.step()  # read with its first host
            store.update_pending(moved, TimerChanges(url="http://other.test/h"))
            clock.advance(100)
            await daemon.step()
            await settle(daemon)
            later = add_timer(store, START_MS + 200)  # the first host's one slot must be free
            daemon.window.poll_soon()
            clock.advance(100)
            await daemon.step()
            await settle(daemon)
            assert recorder.ids == [moved, later]

    run(scenario)
