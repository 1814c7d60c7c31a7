"""The daemon's parts, each alone: the due window and the claimer (the outcome judge is a pure
function, tested in tests/test_daemon.py and tests/test_retry.py; the supervisor is the daemon)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tests.support.offload import inline
from tests.test_daemon import START_MS, FakeClock, add_timer, settings
from timerd.claims import Claimer
from timerd.hosts import Entry, HostSlots
from timerd.models import Due, State
from timerd.store.base import Store
from timerd.window import DueWindow


def due(n: int, host: str = "a.test") -> Due:
    return Due(id=f"{n:024x}", due_at_ms=START_MS + n, url=f"https://{host}/hooks/{n}")


class Pages:
    """The due index as pages of `Due` in due order, recording each read."""

    def __init__(self, dues: list[Due]) -> None:
        self.dues = dues
        self.reads: list[tuple[int, str] | None] = []

    async def __call__(
        self, before_ms: int, limit: int, after: tuple[int, str] | None
    ) -> Sequence[Due]:
        self.reads.append(after)
        rest = [d for d in self.dues if after is None or (d.due_at_ms, d.id) > after]
        return [d for d in rest if d.due_at_ms < before_ms][:limit]


def window(clock: FakeClock, per_host: int = 2, batch: int = 4) -> DueWindow:
    return DueWindow(HostSlots(per_host, park_limit=batch), batch, 1.0, clock)


def test_the_window_takes_what_is_due_a_slot_per_host_and_parks_the_rest() -> None:
    clock = FakeClock()
    w = window(clock)
    asyncio.run(w.poll(Pages([due(1), due(2), due(3), due(4, "b.test")]), START_MS + 10))
    assert w.earliest_ms == START_MS + 1 and len(w) == 4
    assert w.take_due(START_MS + 2, 10, lambda _: True) == [Entry.of(due(1)), Entry.of(due(2))]
    taken = w.take_due(START_MS + 10, 10, lambda _: True)
    assert taken == [Entry.of(due(4, "b.test"))]  # a.test has no slot for 3: parked
    assert w.hosts.parked == 1 and len(w) == 0
    assert w.give_back("a.test")  # a slot is free (a release batch, with two per host): 3 is back
    assert w.hosts.parked == 0 and len(w) == 1


def test_the_window_drops_what_this_daemon_no_longer_holds() -> None:
    clock = FakeClock()
    w = window(clock)
    asyncio.run(w.poll(Pages([due(1), due(2)]), START_MS + 10))
    taken = w.take_due(START_MS + 10, 10, lambda timer_id: timer_id == due(2).id)
    assert taken == [Entry.of(due(2))] and len(w) == 0 and w.hosts.held == 1


def test_a_poll_reads_past_a_full_hosts_backlog() -> None:
    clock = FakeClock()
    w = DueWindow(HostSlots(1, park_limit=1), 4, 1.0, clock)
    pages = Pages([due(n) for n in range(1, 9)] + [due(20, "b.test")])
    asyncio.run(w.poll(pages, START_MS + 100))
    assert w.take_due(START_MS + 100, 100, lambda _: True) == [Entry.of(due(1))]
    assert w.hosts.parked == 1  # 2 is parked; 3 and 4 were dropped (a.test's park is full)
    pages.reads.clear()
    asyncio.run(w.poll(pages, START_MS + 100))
    assert len(pages.reads) == 3  # two pages of a.test's backlog, then what lies past it
    assert len(w) == 1 and w.earliest_ms == START_MS + 20


def test_an_entry_announced_during_a_poll_is_kept() -> None:
    clock = FakeClock()
    w = window(clock)
    pages = Pages([due(1)])

    async def announcing(
        before_ms: int, limit: int, after: tuple[int, str] | None
    ) -> Sequence[Due]:
        w.add(Entry.of(due(2, "c.test")))  # a create in this process, heard mid-poll
        return await pages(before_ms, limit, after)

    asyncio.run(w.poll(announcing, START_MS + 10))
    assert len(w) == 2 and w.earliest_ms == START_MS + 1


def test_the_window_polls_on_its_interval_or_when_told() -> None:
    clock = FakeClock()
    w = window(clock)
    assert w.poll_is_due()
    asyncio.run(w.poll(Pages([]), START_MS + 10))
    assert not w.poll_is_due() and w.idle_s(START_MS) == 1.0
    clock.advance(1000)
    assert w.poll_is_due()
    asyncio.run(w.poll(Pages([due(5000)]), START_MS + 10_000))
    assert w.idle_s(clock.now_ms()) == 1.0  # the next poll comes before the entry is due
    asyncio.run(w.poll(Pages([due(1500)]), START_MS + 10_000))
    assert w.idle_s(clock.now_ms()) == 0.5  # the entry comes first
    w.poll_soon()
    assert w.poll_is_due()


def claimer(store: Store, clock: FakeClock) -> Claimer:
    return Claimer(settings(), store, clock, inline, "me")


def test_the_claimer_claims_due_timers_once(store: Store) -> None:
    clock = FakeClock()
    ids = [add_timer(store, START_MS), add_timer(store, START_MS + 60_000)]
    first = asyncio.run(claimer(store, clock).claim(ids, START_MS))
    assert [t.id for t in first] == ids[:1] and first[0].claimed_by == "me"
    assert asyncio.run(claimer(store, clock).claim(ids, START_MS)) == []  # firing already


def test_a_late_claim_is_not_fired_and_is_released_before_the_next(store: Store) -> None:
    clock = FakeClock()
    timer_id = add_timer(store, START_MS)
    c = claimer(store, clock)
    clock.advance(settings().claim_ttl_ms)  # the claim comes back with no time left
    assert asyncio.run(c.claim([timer_id], START_MS)) == []
    assert c.unsettled == 1 and store.get(timer_id).state is State.FIRING
    assert asyncio.run(c.settle()) is True
    assert c.unsettled == 0 and store.get(timer_id).state is State.PENDING
    assert store.get(timer_id).attempts == 0  # a released claim costs no attempt
