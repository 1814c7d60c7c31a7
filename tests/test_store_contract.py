"""The store contract (`timerd/store/base.py`), held against every backend.

Every test up to the SQLite section runs on SQLite, on mongomock and, when
`TIMERD_TEST_MONGO_URI` is set, on a real MongoDB (see `conftest.py`); the races skip mongomock,
which is not thread-safe. Time is always a fixed integer passed in, never read from a clock. The
last section covers what only SQLite has: locking, pragmas and `open_store` URL parsing.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from timerd.errors import ConfigError, StoreUnavailable, TimerNotFound, TimerStateConflict
from timerd.models import (
    HISTORY_MAX,
    PARTITIONS,
    ApiKey,
    AttemptRecord,
    Claim,
    Due,
    Lease,
    Outcome,
    State,
    Timer,
    TimerChanges,
    new_claim_token,
    new_timer_id,
    partition_of,
)
from timerd.store import open_store
from timerd.store.base import CLAIM_EXPIRED, Store
from timerd.store.mongo import PENDING_DUE_INDEX, MongoStore
from timerd.store.sqlite import PENDING_DUE_SQL, SqliteStore

T = TypeVar("T")
StoreFactory = Callable[[], Store]  # the `open_store_on_backend` fixture of conftest.py

NOW_MS = 1_700_000_000_000
CLAIM_MS = 30_000
TTL_MS = 10_000
URL = "https://receiver.example/hooks"


def a_timer(due_at_ms: int = NOW_MS) -> Timer:
    return Timer(id=new_timer_id(), url=URL, due_at_ms=due_at_ms, created_at_ms=NOW_MS - 60_000)


def inserted(store: Store, due_at_ms: int = NOW_MS, **fields: object) -> Timer:
    timer = dataclasses.replace(a_timer(due_at_ms), **fields)
    store.insert(timer)
    return timer


def a_claim(owner: str = "leader-a", now_ms: int = NOW_MS) -> Claim:
    return Claim(
        owner=owner,
        now_ms=now_ms,
        until_ms=now_ms + CLAIM_MS,
        token=new_claim_token(),
    )


def claimed_as(timer: Timer, claim: Claim) -> Timer:
    """What claiming `timer` under `claim` must turn it into."""
    return dataclasses.replace(
        timer,
        state=State.FIRING,
        claimed_by=claim.owner,
        claimed_until_ms=claim.until_ms,
        claim_token=claim.token,
        attempts=timer.attempts + 1,
    )


def claimed(store: Store, timer: Timer, claim: Claim | None = None) -> Timer:
    """Claim `timer` (which must be claimable) and return it as it now is."""
    claim = claim or a_claim()
    assert store.claim_due([timer.id], claim) == [claimed_as(timer, claim)]
    return store.get(timer.id)


def outcome_for(timer: Timer, state: State, **fields: object) -> Outcome:
    assert timer.claim_token is not None
    values: dict[str, object] = {"at_ms": NOW_MS + 250, "status": 200} | fields
    return Outcome(timer_id=timer.id, claim_token=timer.claim_token, state=state, **values)


def unclaimed(timer: Timer, **fields: object) -> Timer:
    """`timer` with its claim cleared."""
    values = {"claimed_by": None, "claimed_until_ms": None, "claim_token": None} | fields
    return dataclasses.replace(timer, **values)


def by_id(timers: Sequence[Timer]) -> list[Timer]:
    return sorted(timers, key=lambda t: t.id)


def in_every_state(store: Store) -> dict[State, Timer]:
    """One timer per state, all due long ago, inserted as such."""
    return {
        state: inserted(
            store,
            NOW_MS - 5_000,
            state=state,
            claimed_by="leader-a" if state is State.FIRING else None,
            claimed_until_ms=NOW_MS + CLAIM_MS if state is State.FIRING else None,
            claim_token=new_claim_token() if state is State.FIRING else None,
        )
        for state in State
    }


def run_together(workers: Sequence[Callable[[], T]]) -> list[T]:
    """Run every worker on its own thread, released at the same instant; return their results."""
    barrier = threading.Barrier(len(workers))

    def start(work: Callable[[], T]) -> T:
        barrier.wait(timeout=10)
        return work()

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [pool.submit(start, work) for work in workers]
        return [f.result(timeout=60) for f in futures]


# insert / get


def test_get_returns_an_inserted_timer_as_it_was_inserted(store: Store) -> None:
    timer = a_timer()
    store.insert(timer)
    assert store.get(timer.id) == timer


def test_insert_and_get_round_trip_every_field(store: Store) -> None:
    timer = Timer(
        id=new_timer_id(),
        url="https://receiver.example/a path/ü?q=1&r='2'",
        due_at_ms=2**53 - 1,
        created_at_ms=NOW_MS,
        state=State.FAILED,
        attempts=7,
        fired_at_ms=NOW_MS + 1,
        claimed_by="leader-ü",
        claimed_until_ms=NOW_MS + 2,
        claim_token="token-ü",
        last_status=503,
        last_error="connect timeout: 'receiver.example' ✗",
        payload='{"order":42,"note":"ü ✗","nested":[1,2.5,null,true]}',
        headers=(("x-tenant", "acme"), ("authorization", "Bearer ü")),
        max_attempts=3,
        history=(AttemptRecord(attempt=1, at_ms=NOW_MS, latency_ms=1.5, error="timeout"),),
        tenant="acme",
        idempotency_key="key-ü",
        request_hash="hash",
        finished_at_ms=NOW_MS + 3,
        fired_by="daemon-ü",
    )
    store.insert(timer)
    assert store.get(timer.id) == timer


def test_concurrent_inserts_all_land(store: Store) -> None:
    timers = [a_timer(NOW_MS + i) for i in range(64)]
    run_together([lambda t=t: store.insert(t) for t in timers])
    assert [store.get(t.id) for t in timers] == timers


def test_get_of_an_unknown_id_raises_timer_not_found(store: Store) -> None:
    timer = inserted(store)
    for unknown in (new_timer_id(), timer.id.upper()):
        with pytest.raises(TimerNotFound):
            store.get(unknown)


@pytest.mark.parametrize(
    "timer_id",
    ["", "abc", "0" * 23, "0" * 25, "z" * 24, "../" * 8, "' OR '1'='1' --", "{'$ne': None}"],
)
def test_get_of_a_malformed_id_raises_timer_not_found(store: Store, timer_id: str) -> None:
    inserted(store)
    with pytest.raises(TimerNotFound):
        store.get(timer_id)


# cancel


def test_cancel_moves_a_pending_timer_to_cancelled_and_returns_it(store: Store) -> None:
    timer = inserted(store)
    expected = dataclasses.replace(timer, state=State.CANCELLED, finished_at_ms=NOW_MS)
    assert store.cancel(timer.id, NOW_MS) == expected
    assert store.get(timer.id) == expected


@pytest.mark.parametrize("state", [s for s in State if s is not State.PENDING])
def test_cancel_in_any_other_state_conflicts_and_changes_nothing(
    store: Store, state: State
) -> None:
    timer = in_every_state(store)[state]
    with pytest.raises(TimerStateConflict) as raised:
        store.cancel(timer.id, NOW_MS)
    assert (raised.value.timer_id, raised.value.state) == (timer.id, state.value)
    assert store.get(timer.id) == timer


@pytest.mark.parametrize("timer_id", [new_timer_id(), "not-an-id", ""])
def test_cancel_of_an_unknown_or_malformed_id_raises_timer_not_found(
    store: Store, timer_id: str
) -> None:
    with pytest.raises(TimerNotFound):
        store.cancel(timer_id, NOW_MS)


def test_a_cancelled_timer_is_neither_due_nor_claimable(store: Store) -> None:
    timer = inserted(store, NOW_MS - 1)
    store.cancel(timer.id, NOW_MS)
    assert store.pending_due(NOW_MS + 1, 10) == []
    assert store.next_due_at_ms() is None
    assert store.claim_due([timer.id], a_claim()) == []
    assert store.get(timer.id).state is State.CANCELLED


# pending_due / next_due_at_ms


def test_pending_due_lists_pending_timers_due_strictly_before_in_due_then_id_order(
    store: Store,
) -> None:
    pending = in_every_state(store)[State.PENDING]  # all due at NOW_MS - 5_000
    ties = sorted((new_timer_id() for _ in range(4)), reverse=True)  # inserted against id order
    for timer_id in ties:
        store.insert(dataclasses.replace(a_timer(NOW_MS - 100), id=timer_id))
    later = inserted(store, NOW_MS - 1)
    earlier = inserted(store, NOW_MS - 200)
    inserted(store, NOW_MS)  # not strictly before
    inserted(store, NOW_MS + 1)

    assert store.pending_due(NOW_MS, 100) == [
        Due(id=pending.id, due_at_ms=NOW_MS - 5_000, url=URL),
        Due(id=earlier.id, due_at_ms=NOW_MS - 200, url=URL),
        *[Due(id=i, due_at_ms=NOW_MS - 100, url=URL) for i in sorted(ties)],
        Due(id=later.id, due_at_ms=NOW_MS - 1, url=URL),
    ]


def test_pending_due_returns_at_most_limit_timers_earliest_first(store: Store) -> None:
    timers = [inserted(store, NOW_MS - 10 + i) for i in (5, 3, 8, 1, 9, 2)]
    earliest = sorted(timers, key=lambda t: t.due_at_ms)
    assert store.pending_due(NOW_MS, 3) == [Due(t.id, t.due_at_ms, URL) for t in earliest[:3]]
    assert store.pending_due(NOW_MS, 1) == [Due(earliest[0].id, earliest[0].due_at_ms, URL)]
    assert store.pending_due(NOW_MS, 0) == []


def test_pending_due_after_a_cursor_reads_the_next_page(store: Store) -> None:
    timers = [inserted(store, NOW_MS - 100 + i // 2) for i in range(7)]  # ties of two
    expected = [
        Due(t.id, t.due_at_ms, URL) for t in sorted(timers, key=lambda t: (t.due_at_ms, t.id))
    ]
    first = store.pending_due(NOW_MS, 3)
    second = store.pending_due(NOW_MS, 3, (first[-1].due_at_ms, first[-1].id))
    third = store.pending_due(NOW_MS, 3, (second[-1].due_at_ms, second[-1].id))
    assert first + second + third == expected


def test_pending_due_of_an_empty_store_is_empty(store: Store) -> None:
    assert store.pending_due(NOW_MS, 10) == []


def test_next_due_at_ms_is_the_earliest_pending_due_time(store: Store) -> None:
    assert store.next_due_at_ms() is None
    in_every_state(store)
    first = store.pending_due(NOW_MS, 1)[0]
    store.cancel(first.id, NOW_MS)
    assert store.next_due_at_ms() is None  # only non-pending timers are left
    inserted(store, NOW_MS + 70)
    soonest = inserted(store, NOW_MS + 20)
    inserted(store, NOW_MS + 50)
    assert store.next_due_at_ms() == NOW_MS + 20
    claimed(store, soonest, a_claim(now_ms=NOW_MS + 20))
    assert store.next_due_at_ms() == NOW_MS + 50


# claim_due


def test_claim_due_claims_pending_timers_due_by_now_and_returns_them(store: Store) -> None:
    overdue, due_now = inserted(store, NOW_MS - 1_000, attempts=2), inserted(store, NOW_MS)
    claim = a_claim()
    expected = by_id([claimed_as(overdue, claim), claimed_as(due_now, claim)])
    assert by_id(store.claim_due([overdue.id, due_now.id], claim)) == expected
    assert by_id([store.get(overdue.id), store.get(due_now.id)]) == expected
    assert store.pending_due(NOW_MS + 1, 10) == []


def test_claim_due_leaves_out_what_it_cannot_claim_and_changes_it_not(store: Store) -> None:
    everything = in_every_state(store)
    not_yet_due = inserted(store, NOW_MS + 1)
    ids = [t.id for t in everything.values()] + [not_yet_due.id, new_timer_id(), "bogus"]
    claim = a_claim(owner="leader-b")

    assert store.claim_due(ids, claim) == [claimed_as(everything[State.PENDING], claim)]
    for state, timer in everything.items():
        if state is not State.PENDING:
            assert store.get(timer.id) == timer
    assert store.get(not_yet_due.id) == not_yet_due


def test_claim_due_of_no_ids_claims_nothing(store: Store) -> None:
    timer = inserted(store, NOW_MS - 1)
    assert store.claim_due([], a_claim()) == []
    assert store.get(timer.id) == timer


def test_a_timer_claimed_by_someone_else_is_not_claimed_again(store: Store) -> None:
    timer = claimed(store, inserted(store), a_claim(owner="leader-a"))
    assert store.claim_due([timer.id], a_claim(owner="leader-b")) == []
    assert store.get(timer.id) == timer


def test_a_timer_rescheduled_later_is_not_claimed_until_it_is_due_again(store: Store) -> None:
    firing = claimed(store, inserted(store))
    outcome = outcome_for(firing, State.PENDING, status=503, next_due_at_ms=NOW_MS + 5_000)
    assert store.complete([outcome]) == 1
    rescheduled = store.get(firing.id)

    assert store.claim_due([firing.id], a_claim(now_ms=NOW_MS + 4_999)) == []
    assert store.get(firing.id) == rescheduled
    again = a_claim(now_ms=NOW_MS + 5_000)
    assert store.claim_due([firing.id], again) == [claimed_as(rescheduled, again)]
    assert store.get(firing.id).attempts == 2


# complete


def test_complete_fired_records_the_delivery_and_clears_the_claim(store: Store) -> None:
    firing = claimed(store, inserted(store))
    assert store.complete([outcome_for(firing, State.FIRED, at_ms=NOW_MS + 7)]) == 1
    assert store.get(firing.id) == dataclasses.replace(
        firing,
        state=State.FIRED,
        fired_at_ms=NOW_MS + 7,
        finished_at_ms=NOW_MS + 7,
        last_status=200,
        last_error=None,
        claimed_by=None,
        claimed_until_ms=None,
        claim_token=None,
    )


def test_complete_failed_ends_the_timer_and_clears_the_claim(store: Store) -> None:
    firing = claimed(store, inserted(store))
    outcome = outcome_for(firing, State.FAILED, status=410, error="410 Gone")
    assert store.complete([outcome]) == 1
    assert store.get(firing.id) == dataclasses.replace(
        firing,
        state=State.FAILED,
        finished_at_ms=NOW_MS + 250,
        last_status=410,
        last_error="410 Gone",
        claimed_by=None,
        claimed_until_ms=None,
        claim_token=None,
    )


def test_complete_pending_reschedules_the_timer_for_another_attempt(store: Store) -> None:
    firing = claimed(store, inserted(store))
    outcome = outcome_for(
        firing, State.PENDING, status=None, error="connection refused", next_due_at_ms=NOW_MS + 900
    )
    assert store.complete([outcome]) == 1
    assert store.get(firing.id) == dataclasses.replace(
        firing,
        state=State.PENDING,
        due_at_ms=NOW_MS + 900,
        last_status=None,
        last_error="connection refused",
        claimed_by=None,
        claimed_until_ms=None,
        claim_token=None,
    )
    assert store.pending_due(NOW_MS + 901, 10) == [Due(firing.id, NOW_MS + 900, URL)]


def test_complete_applies_only_outcomes_of_the_current_claim(store: Store) -> None:
    everything = in_every_state(store)
    firing = everything[State.FIRING]
    applies = outcome_for(firing, State.FIRED)
    ignored = [
        dataclasses.replace(applies, claim_token=new_claim_token()),
        *(
            dataclasses.replace(applies, timer_id=t.id)
            for s, t in everything.items()
            if s is not State.FIRING
        ),
        dataclasses.replace(applies, timer_id=new_timer_id()),
    ]

    assert store.complete(ignored) == 0
    assert [store.get(t.id) for t in everything.values()] == list(everything.values())
    assert store.complete([*ignored, applies, applies]) == 1
    assert store.get(firing.id).state is State.FIRED


def test_complete_of_no_outcomes_applies_none(store: Store) -> None:
    assert store.complete([]) == 0


def test_a_deposed_leader_cannot_overwrite_its_successors_claim(store: Store) -> None:
    timer = inserted(store)
    old = claimed(store, timer, a_claim(owner="leader-a"))
    assert store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5) == 1
    new_claim = a_claim(owner="leader-b", now_ms=NOW_MS + CLAIM_MS + 1)
    new = claimed(store, store.get(timer.id), new_claim)

    assert store.complete([outcome_for(old, State.FIRED)]) == 0
    assert store.release_claim(old.claim_token or "") == 0
    assert store.get(timer.id) == new
    assert store.complete([outcome_for(new, State.FAILED, status=500)]) == 1
    assert store.get(timer.id).state is State.FAILED


def test_a_late_outcome_never_lands_on_a_newer_claim_of_the_same_leader(store: Store) -> None:
    first = claimed(store, inserted(store))
    assert store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5) == 1
    second = claimed(store, store.get(first.id), a_claim(now_ms=NOW_MS + CLAIM_MS + 1))
    assert second.claimed_by == first.claimed_by

    assert store.complete([outcome_for(first, State.PENDING, next_due_at_ms=NOW_MS)]) == 0
    assert store.get(first.id) == second


def test_an_outcome_after_the_sweep_leaves_the_timer_pending(store: Store) -> None:
    firing = claimed(store, inserted(store))
    assert store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5) == 1
    swept = store.get(firing.id)
    assert store.complete([outcome_for(firing, State.FIRED)]) == 0
    assert store.get(firing.id) == swept


# release_claim


def test_release_claim_undoes_a_claim_that_was_never_delivered(store: Store) -> None:
    timers = [inserted(store, NOW_MS - i) for i in range(3)]
    claim = a_claim()
    assert len(store.claim_due([t.id for t in timers], claim)) == 3
    other = claimed(store, inserted(store))

    assert store.release_claim(claim.token) == 3
    assert by_id([store.get(t.id) for t in timers]) == by_id(timers)
    assert store.release_claim(claim.token) == 0
    assert store.get(other.id) == other


def test_release_claim_leaves_timers_whose_outcome_was_written(store: Store) -> None:
    firing = claimed(store, inserted(store))
    assert store.complete([outcome_for(firing, State.FIRED)]) == 1
    fired = store.get(firing.id)
    assert store.release_claim(firing.claim_token or "") == 0
    assert store.get(firing.id) == fired


# recover_expired


def expired_as(timer: Timer, now_ms: int, state: State = State.PENDING) -> Timer:
    """What the sweep must turn an expired claim into: a failed attempt on the record."""
    record = AttemptRecord(timer.attempts, now_ms, 0, error=CLAIM_EXPIRED)
    return unclaimed(
        timer,
        state=state,
        finished_at_ms=now_ms if state is State.FAILED else None,
        last_status=None,
        last_error=CLAIM_EXPIRED,
        history=(*timer.history, record),
    )


def test_recover_expired_settles_only_expired_claims(store: Store) -> None:
    long_ago_ms = NOW_MS - 2 * CLAIM_MS
    expired = claimed(store, inserted(store, long_ago_ms), a_claim(now_ms=NOW_MS - CLAIM_MS - 1))
    at_deadline = claimed(store, inserted(store, long_ago_ms), a_claim(now_ms=NOW_MS - CLAIM_MS))
    live = claimed(store, inserted(store, long_ago_ms))
    others = in_every_state(store)
    others.pop(State.FIRING)  # live until NOW_MS + CLAIM_MS

    assert store.recover_expired(NOW_MS, 10, 5) == 1
    assert store.get(expired.id) == expired_as(expired, NOW_MS)
    assert [store.get(t.id) for t in (at_deadline, live, *others.values())] == [
        at_deadline,
        live,
        *others.values(),
    ]
    assert store.recover_expired(NOW_MS, 10, 5) == 0


def test_recover_expired_fails_a_timer_whose_attempts_are_spent(store: Store) -> None:
    own_budget = claimed(store, inserted(store, max_attempts=1))
    default_budget = claimed(store, inserted(store, attempts=2))
    budget_left = claimed(store, inserted(store, max_attempts=5, attempts=2))
    later_ms = NOW_MS + CLAIM_MS + 1

    assert store.recover_expired(later_ms, 10, 3) == 3
    assert store.get(own_budget.id) == expired_as(own_budget, later_ms, State.FAILED)
    assert store.get(default_budget.id) == expired_as(default_budget, later_ms, State.FAILED)
    assert store.get(budget_left.id) == expired_as(budget_left, later_ms)


def test_recover_expired_recovers_at_most_limit_timers(store: Store) -> None:
    timers = [claimed(store, inserted(store, NOW_MS - 10 + i)) for i in range(5)]
    after_deadline_ms = NOW_MS + CLAIM_MS + 1
    assert store.recover_expired(after_deadline_ms, 0, 5) == 0
    assert store.recover_expired(after_deadline_ms, 2, 5) == 2
    assert sorted(store.get(t.id).state for t in timers).count(State.PENDING) == 2
    assert store.recover_expired(after_deadline_ms, 10, 5) == 3
    assert {store.get(t.id).state for t in timers} == {State.PENDING}


def test_a_recovered_timer_is_claimed_again_with_its_attempts_kept(store: Store) -> None:
    first = claimed(store, inserted(store))
    later_ms = NOW_MS + CLAIM_MS + 1
    assert store.recover_expired(later_ms, 10, 5) == 1
    assert store.pending_due(later_ms, 10) == [Due(first.id, NOW_MS, URL)]
    second = claimed(store, store.get(first.id), a_claim("leader-b", later_ms))
    assert (second.attempts, second.claimed_by) == (2, "leader-b")


# leases

P0 = "p0"


def test_there_is_no_lease_before_anyone_takes_it(store: Store) -> None:
    assert store.get_lease(P0) is None
    assert store.leases() == []


def test_the_first_holder_gets_epoch_one(store: Store) -> None:
    lease = Lease(P0, holder="a", epoch=1, expires_at_ms=NOW_MS + TTL_MS)
    assert store.acquire_lease(P0, "a", TTL_MS, NOW_MS) == lease
    assert store.get_lease(P0) == lease


def test_the_holder_renews_under_the_same_epoch_live_or_expired(store: Store) -> None:
    store.acquire_lease(P0, "a", TTL_MS, NOW_MS)
    renewed = Lease(P0, holder="a", epoch=1, expires_at_ms=NOW_MS + 1_000 + TTL_MS)
    assert store.acquire_lease(P0, "a", TTL_MS, NOW_MS + 1_000) == renewed
    assert store.get_lease(P0) == renewed
    late_ms = NOW_MS + 5 * TTL_MS
    assert store.acquire_lease(P0, "a", TTL_MS, late_ms) == Lease(P0, "a", 1, late_ms + TTL_MS)


def test_a_live_lease_cannot_be_taken(store: Store) -> None:
    lease = store.acquire_lease(P0, "a", TTL_MS, NOW_MS)
    assert store.acquire_lease(P0, "b", TTL_MS, NOW_MS + 1) is None
    assert store.acquire_lease(P0, "b", TTL_MS, NOW_MS + TTL_MS) is None  # expires == now
    assert store.get_lease(P0) == lease


def test_an_expired_lease_is_taken_under_the_next_epoch(store: Store) -> None:
    store.acquire_lease(P0, "a", TTL_MS, NOW_MS)
    later_ms = NOW_MS + TTL_MS + 1
    taken = Lease(P0, holder="b", epoch=2, expires_at_ms=later_ms + TTL_MS)
    assert store.acquire_lease(P0, "b", TTL_MS, later_ms) == taken
    assert store.get_lease(P0) == taken
    assert store.acquire_lease(P0, "a", TTL_MS, later_ms) is None


def test_leases_are_independent_of_one_another(store: Store) -> None:
    a = store.acquire_lease("p0", "a", TTL_MS, NOW_MS)
    b = store.acquire_lease("p1", "b", TTL_MS, NOW_MS)
    member = store.acquire_lease("member:a", "a", TTL_MS, NOW_MS)
    assert store.acquire_lease("p1", "a", TTL_MS, NOW_MS) is None
    assert store.leases() == [member, a, b]  # by name


def test_release_expires_the_lease_and_keeps_its_epoch(store: Store) -> None:
    store.acquire_lease(P0, "a", TTL_MS, NOW_MS)
    assert store.release_lease(P0, "a", 1) is True
    assert store.release_lease(P0, "a", 1) is False  # already released
    released = store.get_lease(P0)
    assert released is not None
    assert released == Lease(P0, holder="a", epoch=1, expires_at_ms=released.expires_at_ms)
    assert released.expires_at_ms < NOW_MS
    assert store.acquire_lease(P0, "b", TTL_MS, NOW_MS) == Lease(P0, "b", 2, NOW_MS + TTL_MS)


def test_release_by_anyone_but_the_holder_under_its_epoch_does_nothing(store: Store) -> None:
    assert store.release_lease(P0, "a", 1) is False
    assert store.get_lease(P0) is None
    lease = store.acquire_lease(P0, "a", TTL_MS, NOW_MS)
    assert store.release_lease(P0, "b", 1) is False
    assert store.release_lease(P0, "a", 2) is False
    assert store.release_lease("p1", "a", 1) is False
    assert store.get_lease(P0) == lease
    assert store.acquire_lease(P0, "b", TTL_MS, NOW_MS) is None


def test_renew_leases_renews_only_what_the_holder_still_holds(store: Store) -> None:
    for name in ("p0", "p1", "p2"):
        store.acquire_lease(name, "a", TTL_MS, NOW_MS)
    later_ms = NOW_MS + TTL_MS + 1
    store.acquire_lease("p1", "b", TTL_MS, later_ms)  # expired, so taken by b

    renewed = store.renew_leases("a", ["p0", "p1", "p2", "p3"], TTL_MS, later_ms)
    assert sorted(renewed) == ["p0", "p2"]
    assert store.get_lease("p0") == Lease("p0", "a", 1, later_ms + TTL_MS)
    assert store.get_lease("p1") == Lease("p1", "b", 2, later_ms + TTL_MS)
    assert store.get_lease("p3") is None
    assert store.renew_leases("a", [], TTL_MS, later_ms) == []


def test_delete_leases_forgets_long_expired_ones_by_prefix(store: Store) -> None:
    store.acquire_lease("member:gone", "gone", TTL_MS, NOW_MS)
    store.acquire_lease("member:live", "live", TTL_MS, NOW_MS + 5 * TTL_MS)
    store.acquire_lease("p0", "gone", TTL_MS, NOW_MS)
    assert store.delete_leases("member:", NOW_MS + TTL_MS + 1) == 1
    assert [lease.name for lease in store.leases()] == ["member:live", "p0"]


# partitions


def test_the_partition_count_is_fixed_and_every_timer_has_one(store: Store) -> None:
    assert store.partitions() == PARTITIONS
    timers = [inserted(store) for _ in range(2 * PARTITIONS)]
    partitions = {partition_of(t.id, PARTITIONS) for t in timers}
    assert len(partitions) > PARTITIONS // 2  # consecutive ids spread out


def test_pending_due_and_the_sweep_keep_to_the_partitions_asked_for(store: Store) -> None:
    timers = [inserted(store, NOW_MS - 100 + i) for i in range(20)]
    by_partition: dict[int, list[str]] = {}
    for t in timers:
        by_partition.setdefault(partition_of(t.id, PARTITIONS), []).append(t.id)
    mine = sorted(by_partition)[: len(by_partition) // 2]
    expected = [t.id for t in timers if partition_of(t.id, PARTITIONS) in mine]

    assert [d.id for d in store.pending_due(NOW_MS + 1, 100, None, mine)] == expected
    assert store.pending_due(NOW_MS + 1, 100, None, []) == []
    assert len(store.pending_due(NOW_MS + 1, 100)) == 20
    claim = a_claim()
    assert len(store.claim_due([t.id for t in timers], claim)) == 20
    later_ms = NOW_MS + CLAIM_MS + 1
    assert store.recover_expired(later_ms, 100, 5, mine) == len(expected)
    assert store.recover_expired(later_ms, 100, 5, []) == 0
    assert store.recover_expired(later_ms, 100, 5) == 20 - len(expected)


def test_insert_many_inserts_each_as_insert_would(store: Store) -> None:
    earlier = inserted(store, tenant="acme", idempotency_key="k", request_hash="h")
    fresh = [a_timer() for _ in range(3)]
    retry = dataclasses.replace(a_timer(), tenant="acme", idempotency_key="k", request_hash="h")
    assert store.insert_many([fresh[0], retry, *fresh[1:]]) == [fresh[0], earlier, *fresh[1:]]
    assert [store.get(t.id) for t in fresh] == fresh
    assert store.insert_many([]) == []


def test_a_fired_timer_says_which_daemon_fired_it(store: Store) -> None:
    firing = claimed(store, inserted(store), a_claim(owner="daemon-7"))
    outcome = dataclasses.replace(outcome_for(firing, State.FIRED), owner="daemon-7")
    assert store.complete([outcome]) == 1
    assert store.get(firing.id).fired_by == "daemon-7"


def test_count_by_state_counts_every_state(store: Store) -> None:
    assert store.count_by_state().get(State.PENDING, 0) == 0
    in_every_state(store)
    inserted(store)
    expected = dict.fromkeys(State, 1) | {State.PENDING: 2}
    assert store.count_by_state() == expected


def test_count_active_counts_pending_and_firing_only(store: Store) -> None:
    assert store.count_active() == {State.PENDING: 0, State.FIRING: 0}
    in_every_state(store)
    inserted(store)
    assert store.count_active() == {State.PENDING: 2, State.FIRING: 1}


# finishing and retention


def test_every_way_to_finish_records_when_and_replay_clears_it(store: Store) -> None:
    fired = claimed(store, inserted(store))
    failed = claimed(store, inserted(store))
    retried = claimed(store, inserted(store))
    expired = claimed(store, inserted(store, max_attempts=1))
    cancelled = inserted(store)
    store.complete(
        [
            outcome_for(fired, State.FIRED, at_ms=NOW_MS + 1),
            outcome_for(failed, State.FAILED, at_ms=NOW_MS + 2),
            outcome_for(retried, State.PENDING, at_ms=NOW_MS + 3, next_due_at_ms=NOW_MS + 10),
        ]
    )
    store.cancel(cancelled.id, NOW_MS + 4)
    store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5)

    finished = {t.id: store.get(t.id).finished_at_ms for t in (fired, failed, retried, expired)}
    finished[cancelled.id] = store.get(cancelled.id).finished_at_ms
    assert finished == {
        fired.id: NOW_MS + 1,
        failed.id: NOW_MS + 2,
        retried.id: None,
        expired.id: NOW_MS + CLAIM_MS + 1,
        cancelled.id: NOW_MS + 4,
    }
    assert store.replay(fired.id, NOW_MS + 5).finished_at_ms is None


def finished_at(store: Store, at_ms: int, **fields: object) -> Timer:
    timer = claimed(store, inserted(store, **fields))
    assert store.complete([outcome_for(timer, State.FIRED, at_ms=at_ms)]) == 1
    return store.get(timer.id)


def test_purge_finished_deletes_what_finished_before_the_moment(store: Store) -> None:
    old = [finished_at(store, NOW_MS + i) for i in range(5)]
    recent = finished_at(store, NOW_MS + 100)
    unfinished = [inserted(store), claimed(store, inserted(store))]

    assert store.purge_finished(NOW_MS + 100, 0) == 0
    assert store.purge_finished(NOW_MS + 100, 3) == 3
    assert store.purge_finished(NOW_MS + 100, 10) == 2
    assert store.purge_finished(NOW_MS + 100, 10) == 0
    for timer in old:
        with pytest.raises(TimerNotFound):
            store.get(timer.id)
    assert [store.get(t.id) for t in (recent, *unfinished)] == [recent, *unfinished]


def test_a_purged_timers_idempotency_key_can_be_used_again(store: Store) -> None:
    first = finished_at(store, NOW_MS, tenant="acme", idempotency_key="k", request_hash="h")
    assert store.purge_finished(NOW_MS + 1, 10) == 1
    assert store.find_by_idempotency_key("acme", "k") is None
    again = a_timer()
    again = dataclasses.replace(again, tenant="acme", idempotency_key="k", request_hash="h2")
    assert store.insert(again) == again
    assert first.id != again.id


def test_ping_answers(store: Store) -> None:
    assert store.ping() is None


# attempt history, listing, replay


def test_complete_appends_each_attempt_to_the_history_keeping_the_newest(store: Store) -> None:
    timer = inserted(store)
    for n in range(1, HISTORY_MAX + 3):
        current = claimed(store, store.get(timer.id), a_claim(now_ms=NOW_MS + n))
        record = AttemptRecord(
            attempt=n, at_ms=NOW_MS + n, latency_ms=n / 2, status=500, response="ü" * n
        )
        retry = outcome_for(current, State.PENDING, next_due_at_ms=NOW_MS + n, record=record)
        assert store.complete([retry]) == 1
    history = store.get(timer.id).history
    assert [r.attempt for r in history] == list(range(3, HISTORY_MAX + 3))
    assert history[-1] == AttemptRecord(
        attempt=HISTORY_MAX + 2,
        at_ms=NOW_MS + HISTORY_MAX + 2,
        latency_ms=(HISTORY_MAX + 2) / 2,
        status=500,
        response="ü" * (HISTORY_MAX + 2),
    )


@pytest.mark.parametrize("retries", [0, 1, HISTORY_MAX + 1])
def test_a_delivery_after_retries_records_the_fire_and_its_attempt_last(
    store: Store, retries: int
) -> None:
    timer = inserted(store)
    for n in range(1, retries + 2):
        current = claimed(store, store.get(timer.id), a_claim(now_ms=NOW_MS + n))
        delivered = n == retries + 1
        record = AttemptRecord(attempt=n, at_ms=NOW_MS + n, latency_ms=1.5, status=500)
        outcome = outcome_for(
            current,
            State.FIRED if delivered else State.PENDING,
            at_ms=NOW_MS + n,
            status=200 if delivered else 500,
            owner="daemon-a",
            next_due_at_ms=None if delivered else NOW_MS + n,
            record=dataclasses.replace(record, status=200) if delivered else record,
        )
        assert store.complete([outcome]) == 1
    fired = store.get(timer.id)
    assert (fired.state, fired.attempts, fired.last_status, fired.last_error) == (
        State.FIRED,
        retries + 1,
        200,
        None,
    )
    at_ms = NOW_MS + retries + 1
    assert (fired.fired_at_ms, fired.finished_at_ms, fired.fired_by) == (at_ms, at_ms, "daemon-a")
    assert (fired.claimed_by, fired.claimed_until_ms, fired.claim_token) == (None, None, None)
    assert [r.attempt for r in fired.history] == list(range(1, retries + 2))[-HISTORY_MAX:]
    assert fired.history[-1].status == 200


def test_an_outcome_without_a_record_leaves_the_history_alone(store: Store) -> None:
    current = claimed(store, inserted(store))
    assert store.complete([outcome_for(current, State.PENDING, next_due_at_ms=NOW_MS)]) == 1
    assert store.get(current.id).history == ()


def test_list_timers_pages_newest_first_by_state(store: Store) -> None:
    failed = [inserted(store, state=State.FAILED) for _ in range(5)]
    inserted(store)  # pending: not listed under failed
    newest_first = sorted(failed, key=lambda t: t.id, reverse=True)
    first_page = store.list_timers(State.FAILED, None, 3)
    assert first_page == newest_first[:3]
    assert store.list_timers(State.FAILED, first_page[-1].id, 3) == newest_first[3:]
    assert len(store.list_timers(None, None, 10)) == 6
    assert store.list_timers(State.FAILED, None, 0) == []


@pytest.mark.parametrize("state", [State.FAILED, State.FIRED])
def test_replay_puts_a_finished_timer_back_to_fire_now(store: Store, state: State) -> None:
    record = AttemptRecord(attempt=1, at_ms=NOW_MS, latency_ms=1.0, status=410)
    timer = inserted(store, NOW_MS - 9_000, state=state, attempts=4, history=(record,))
    replayed = store.replay(timer.id, NOW_MS)
    expected = dataclasses.replace(timer, state=State.PENDING, due_at_ms=NOW_MS, attempts=0)
    assert replayed == expected == store.get(timer.id)
    assert store.pending_due(NOW_MS + 1, 10) == [Due(timer.id, NOW_MS, URL)]


def test_replay_of_a_pending_firing_or_cancelled_timer_conflicts(store: Store) -> None:
    timers = in_every_state(store)
    for state in (State.PENDING, State.FIRING, State.CANCELLED):
        with pytest.raises(TimerStateConflict):
            store.replay(timers[state].id, NOW_MS)
        assert store.get(timers[state].id) == timers[state]
    with pytest.raises(TimerNotFound):
        store.replay(new_timer_id(), NOW_MS)


# tenants, idempotency, changes, API keys


def test_another_tenants_timer_is_as_good_as_missing(store: Store) -> None:
    timer = inserted(store, tenant="acme")
    failed = inserted(store, tenant="acme", state=State.FAILED)
    assert store.get(timer.id, "acme") == timer == store.get(timer.id)
    with pytest.raises(TimerNotFound):
        store.get(timer.id, "globex")
    with pytest.raises(TimerNotFound):
        store.cancel(timer.id, NOW_MS, "globex")
    with pytest.raises(TimerNotFound):
        store.update_pending(timer.id, TimerChanges(due_at_ms=NOW_MS + 1), "globex")
    with pytest.raises(TimerNotFound):
        store.replay(failed.id, NOW_MS, "globex")
    assert store.list_timers(None, None, 10, "globex") == []
    assert store.list_timers(None, None, 10, "acme") == by_id([timer, failed])[::-1]
    assert store.get(timer.id) == timer and store.get(failed.id) == failed  # nothing changed
    assert store.cancel(timer.id, NOW_MS, "acme").state is State.CANCELLED


def test_an_idempotency_key_inserts_once_per_tenant(store: Store) -> None:
    first = a_timer()
    first = dataclasses.replace(first, tenant="acme", idempotency_key="k1", request_hash="h1")
    assert store.insert(first) == first
    again = dataclasses.replace(a_timer(), tenant="acme", idempotency_key="k1", request_hash="h2")
    assert store.insert(again) == first  # the original, whatever the new request was
    other_tenant = dataclasses.replace(again, id=new_timer_id(), tenant="globex")
    assert store.insert(other_tenant) == other_tenant
    without_keys = [inserted(store, tenant="acme") for _ in range(2)]
    assert [store.get(t.id) for t in without_keys] == without_keys
    with pytest.raises(TimerNotFound):
        store.get(again.id)
    assert store.find_by_idempotency_key("acme", "k1") == first
    assert store.find_by_idempotency_key("acme", "k2") is None
    assert store.find_by_idempotency_key("nobody", "k1") is None


def test_concurrent_inserts_with_one_idempotency_key_insert_exactly_one(
    open_racing_store: StoreFactory,
) -> None:
    stores = [open_racing_store() for _ in range(2)]
    timers = [
        dataclasses.replace(a_timer(), tenant="acme", idempotency_key="same", request_hash="h")
        for _ in range(8)
    ]
    results = run_together([lambda s=stores[i % 2], t=t: s.insert(t) for i, t in enumerate(timers)])
    assert len({r.id for r in results}) == 1
    assert store_count(stores[0]) == 1


def store_count(store: Store) -> int:
    return sum(store.count_by_state().values())


def test_update_pending_changes_only_what_is_given(store: Store) -> None:
    timer = inserted(store, headers=(("x-a", "1"),), payload='{"a":1}')
    changed = store.update_pending(
        timer.id, TimerChanges(due_at_ms=NOW_MS + 9, url="https://other.example/h")
    )
    expected = dataclasses.replace(timer, due_at_ms=NOW_MS + 9, url="https://other.example/h")
    assert changed == expected == store.get(timer.id)
    cleared = store.update_pending(timer.id, TimerChanges(payload="null", headers=()))
    assert (cleared.payload, cleared.headers, cleared.url) == ("null", (), expected.url)


def test_update_pending_of_a_claimed_or_finished_timer_conflicts(store: Store) -> None:
    timers = in_every_state(store)
    for state in (State.FIRING, State.FIRED, State.FAILED, State.CANCELLED):
        with pytest.raises(TimerStateConflict):
            store.update_pending(timers[state].id, TimerChanges(due_at_ms=NOW_MS))
        assert store.get(timers[state].id) == timers[state]


def test_count_pending_counts_one_tenants_pending_timers(store: Store) -> None:
    for _ in range(3):
        inserted(store, tenant="acme")
    inserted(store, tenant="acme", state=State.FIRED)
    inserted(store, tenant="globex")
    counts = [store.count_pending("acme", 10), store.count_pending("nobody", 10)]
    assert counts == [3, 0]
    assert [store.count_pending("acme", limit) for limit in (0, 1, 2, 3, 4)] == [0, 1, 2, 3, 3]


def test_api_keys_are_added_listed_and_revoked(store: Store) -> None:
    first = ApiKey("k1", "ci", "acme", "hash1", NOW_MS)
    second = ApiKey("k2", "ops", "globex", "hash2", NOW_MS + 1)
    store.add_key(second)
    store.add_key(first)
    assert store.get_key("k1") == first and store.get_key("nope") is None
    assert store.list_keys() == [first, second]
    assert store.revoke_key("k1", NOW_MS + 5) is True
    assert store.revoke_key("k1", NOW_MS + 6) is False
    assert store.get_key("k1") == dataclasses.replace(first, revoked_at_ms=NOW_MS + 5)


# the due-time index


@pytest.mark.parametrize(
    ("partitions", "params"), [("", (0, 1)), ("AND partition IN (?, ?)", (0, 3, 5, 1))]
)
def test_the_due_query_is_served_by_the_partial_index_over_pending_timers(
    store: Store, partitions: str, params: tuple[int, ...]
) -> None:
    if isinstance(store, SqliteStore):
        sql = PENDING_DUE_SQL.format(after="", partitions=partitions)
        with closing(sqlite3.connect(store.path)) as conn:
            plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        assert len(plan) == 1  # one index search; no "USE TEMP B-TREE FOR ORDER BY" step
        assert plan[0].startswith("SEARCH timers USING ")
        assert plan[0].endswith("INDEX timers_pending_due (due_at_ms<?)")
    else:
        assert isinstance(store, MongoStore)
        index = store.timer_indexes()[PENDING_DUE_INDEX]
        assert list(index["key"]) == [("due_at_ms", 1), ("_id", 1), ("partition", 1)]
        assert index["partialFilterExpression"] == {"state": "pending"}


# races

RACES_NEED_ATOMIC_WRITES = (
    "mongomock matches and then modifies each document without holding a lock (and copies"
    " documents other threads are changing), so threads racing on it test mongomock, not the"
    " adapter's conditional writes; the races run on SQLite and on a real MongoDB"
)


@pytest.fixture
def open_racing_store(backend: str, open_store_on_backend: StoreFactory) -> StoreFactory:
    if backend == "mongomock":
        pytest.skip(RACES_NEED_ATOMIC_WRITES)
    return open_store_on_backend


def test_concurrent_claims_of_the_same_timers_never_overlap(
    open_racing_store: StoreFactory,
) -> None:
    first, second = open_racing_store(), open_racing_store()
    timers = [a_timer(NOW_MS - 1_000 + i % 50) for i in range(500)]
    for timer in timers:
        first.insert(timer)
    ids = [d.id for d in first.pending_due(NOW_MS + 1, 1_000)]
    assert sorted(ids) == sorted(t.id for t in timers)

    def claimer(store: Store, owner: str) -> Callable[[], list[Timer]]:
        claim = a_claim(owner=owner)
        return lambda: [t for i in range(0, 500, 5) for t in store.claim_due(ids[i : i + 5], claim)]

    got_a, got_b = run_together([claimer(first, "leader-a"), claimer(second, "leader-b")])

    ids_a, ids_b = {t.id for t in got_a}, {t.id for t in got_b}
    assert len(ids_a) + len(ids_b) == len(got_a) + len(got_b) == 500
    assert ids_a | ids_b == set(ids)
    assert {(t.state, t.claimed_by, t.attempts) for t in got_a} <= {(State.FIRING, "leader-a", 1)}
    assert {(t.state, t.claimed_by, t.attempts) for t in got_b} <= {(State.FIRING, "leader-b", 1)}
    assert by_id([first.get(i) for i in ids]) == by_id(got_a + got_b)


def test_concurrent_contenders_for_the_lease_get_exactly_one_holder(
    open_racing_store: StoreFactory,
) -> None:
    stores = [open_racing_store() for _ in range(8)]

    def contend(at_ms: int) -> list[Lease | None]:
        return run_together(
            [
                lambda s=s, i=i: s.acquire_lease(P0, f"d{i}", TTL_MS, at_ms)
                for i, s in enumerate(stores)
            ]
        )

    first = [lease for lease in contend(NOW_MS) if lease is not None]
    assert len(first) == 1
    assert first[0] == Lease(P0, first[0].holder, 1, NOW_MS + TTL_MS)
    assert stores[0].get_lease(P0) == first[0]

    later_ms = NOW_MS + TTL_MS + 1
    second = [lease for lease in contend(later_ms) if lease is not None]
    assert len(second) == 1
    assert second[0] == Lease(P0, second[0].holder, second[0].epoch, later_ms + TTL_MS)
    assert second[0].epoch == (1 if second[0].holder == first[0].holder else 2)
    assert stores[0].get_lease(P0) == second[0]


# SQLite only


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "timerd.db"


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[Store]:
    with closing(open_store(f"sqlite:///{db_path}?busy_timeout_ms=200")) as store:
        yield store


@contextmanager
def write_locked(db_path: Path) -> Iterator[None]:
    """Another connection holding the write lock of the file, as a busy writer would."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as locker:
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")


WRITES: dict[str, Callable[[Store, Timer], object]] = {
    "insert": lambda s, t: s.insert(a_timer()),
    "cancel": lambda s, t: s.cancel(t.id, NOW_MS),
    "claim_due": lambda s, t: s.claim_due([t.id], a_claim()),
    "recover_expired": lambda s, t: s.recover_expired(NOW_MS, 10, 5),
    "release_claim": lambda s, t: s.release_claim("token"),
    "acquire_lease": lambda s, t: s.acquire_lease(P0, "a", TTL_MS, NOW_MS),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_sqlite_write_to_a_locked_file_raises_store_unavailable_after_the_busy_timeout(
    sqlite_store: Store, db_path: Path, write: Callable[[Store, Timer], object]
) -> None:
    timer = inserted(sqlite_store)
    with write_locked(db_path):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            write(sqlite_store, timer)
        waited_s = time.monotonic() - started
    assert 0.15 <= waited_s < 1.5
    assert sqlite_store.get(timer.id) == timer


def test_sqlite_reads_are_served_while_another_connection_writes(
    sqlite_store: Store, db_path: Path
) -> None:
    timer = inserted(sqlite_store)
    with write_locked(db_path):  # WAL: readers never wait for the writer
        assert sqlite_store.get(timer.id) == timer
        assert sqlite_store.pending_due(NOW_MS + 1, 10) == [Due(timer.id, NOW_MS, URL)]
        sqlite_store.ping()


def test_sqlite_opening_a_file_locked_against_readers_raises_store_unavailable(
    db_path: Path,
) -> None:
    open_store(f"sqlite:///{db_path}").close()
    with closing(sqlite3.connect(db_path, isolation_level=None)) as locker:
        locker.execute("PRAGMA locking_mode = EXCLUSIVE")  # shuts readers out, even in WAL
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            open_store(f"sqlite:///{db_path}?busy_timeout_ms=200")
        waited_s = time.monotonic() - started
        locker.execute("ROLLBACK")
    assert 0.15 <= waited_s < 1.5


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/timerd.db",
        "sqlite:///timerd.db?synchronous=OFF",
        "sqlite:///timerd.db?synchronous=",
        "sqlite:///timerd.db?busy_timeout_ms=soon",
        "sqlite:///timerd.db?busy_timeout_ms=",
        "sqlite:///timerd.db?journal_mode=DELETE",
        "sqlite:///timerd.db?readonly",
        "postgres://localhost/timerd",
        "file:///timerd.db",
        "timerd.db",
        "",
        "mongodb://",
        "mongodb://localhost:notaport/timerd",
    ],
)
def test_open_store_rejects_bad_urls_with_config_error(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="TIMERD_STORE"):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_relative_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with closing(open_store("sqlite:///timers.db")) as store:
        timer = inserted(store)
    with closing(open_store(f"sqlite:///{tmp_path / 'timers.db'}")) as store:
        assert store.get(timer.id) == timer


def test_sqlite_runs_in_wal_mode(sqlite_store: Store, db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("query", "for_daemon", "synchronous"),
    [
        ("", False, 2),
        ("", True, 1),
        ("?synchronous=normal", False, 1),
        ("?synchronous=FULL", True, 2),
        ("?synchronous=EXTRA", True, 3),
    ],
)
def test_sqlite_durability_is_full_unless_the_daemon_or_the_url_says_otherwise(
    db_path: Path, query: str, for_daemon: bool, synchronous: int
) -> None:
    with closing(open_store(f"sqlite:///{db_path}{query}", for_daemon=for_daemon)) as store:
        assert isinstance(store, SqliteStore)
        assert store.synchronous_level() == synchronous


def _open_and_close(url: str, barrier: Any) -> None:
    barrier.wait(timeout=30)
    open_store(url).close()


def test_sqlite_processes_opening_a_new_file_at_once_all_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(6)
    workers = [context.Process(target=_open_and_close, args=(url, barrier)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0] * 6


def test_sqlite_api_writes_from_many_threads_never_race_for_the_lock(db_path: Path) -> None:
    store = open_store(f"sqlite:///{db_path}?busy_timeout_ms=1")  # no patience at all
    try:
        timers = [inserted(store, NOW_MS + 60_000) for _ in range(64)]
        work = [lambda t=t: store.cancel(t.id, NOW_MS).state for t in timers]
        work += [lambda: store.insert(a_timer()).state for _ in range(64)]
        states = run_together(work)
    finally:
        store.close()
    assert states == [State.CANCELLED] * 64 + [State.PENDING] * 64


def test_sqlite_timers_survive_closing_and_reopening(db_path: Path) -> None:
    with closing(open_store(f"sqlite:///{db_path}")) as store:
        timer = inserted(store)
    with closing(open_store(f"sqlite:///{db_path}")) as store:
        assert store.get(timer.id) == timer


# recurring timers (series)

SCHEDULE = '{"catch_up":"once","cron":null,"every_ms":60000,"max_occurrences":null,"start_at_ms":0,"timezone":"UTC","until_ms":null}'  # noqa: E501


def a_series(store: Store, due_at_ms: int = NOW_MS, **fields: object) -> Timer:
    values: dict[str, object] = {
        "schedule": SCHEDULE,
        "occurrence": 1,
        "occurrence_at_ms": due_at_ms,
    }
    return inserted(store, due_at_ms, **(values | fields))


def test_a_series_round_trips_its_schedule_and_occurrence(store: Store) -> None:
    timer = a_series(store, occurrences_failed=2)
    assert store.get(timer.id) == timer


def test_complete_moves_a_series_on_in_the_same_write(store: Store) -> None:
    timer = claimed(store, a_series(store))
    delivered = outcome_for(
        timer, State.PENDING, next_due_at_ms=NOW_MS + 60_000, next_occurrence=2, owner="leader-a"
    )
    assert store.complete([delivered]) == 1
    after = store.get(timer.id)
    assert (after.state, after.occurrence, after.occurrence_at_ms, after.due_at_ms) == (
        State.PENDING,
        2,
        NOW_MS + 60_000,
        NOW_MS + 60_000,
    )
    assert (after.attempts, after.fired_at_ms, after.fired_by) == (0, NOW_MS + 250, "leader-a")
    assert (after.occurrences_failed, after.finished_at_ms) == (0, None)
    assert store.complete([delivered]) == 0, "applied twice"


def test_a_failed_occurrence_is_counted_and_a_retry_keeps_the_occurrence(store: Store) -> None:
    timer = claimed(store, a_series(store))
    retry = outcome_for(timer, State.PENDING, status=503, next_due_at_ms=NOW_MS + 1000)
    assert store.complete([retry]) == 1
    after = store.get(timer.id)
    assert (after.occurrence, after.occurrence_at_ms, after.attempts) == (1, NOW_MS, 1)
    timer = claimed(store, after, a_claim(now_ms=NOW_MS + 1000))
    failed = outcome_for(
        timer,
        State.PENDING,
        status=410,
        next_due_at_ms=NOW_MS + 60_000,
        next_occurrence=2,
        occurrence_failed=True,
    )
    assert store.complete([failed]) == 1
    after = store.get(timer.id)
    assert (after.occurrence, after.occurrences_failed, after.attempts) == (2, 1, 0)
    assert after.fired_at_ms is None


def test_pause_and_resume_a_series(store: Store) -> None:
    timer = a_series(store)
    paused = store.pause(timer.id)
    assert paused.state is State.PAUSED
    assert store.pending_due(NOW_MS + 10**9, 10) == []
    with pytest.raises(TimerStateConflict):
        store.pause(timer.id)
    resumed = store.resume(timer.id, NOW_MS + 120_000)
    assert (resumed.state, resumed.due_at_ms, resumed.occurrence_at_ms) == (
        State.PENDING,
        NOW_MS + 120_000,
        NOW_MS + 120_000,
    )
    with pytest.raises(TimerStateConflict):
        store.resume(timer.id, NOW_MS)


def test_only_a_series_can_be_paused(store: Store) -> None:
    with pytest.raises(TimerNotFound):
        store.pause(inserted(store).id)


def test_a_series_ends_when_cancelled_even_while_firing(store: Store) -> None:
    timer = claimed(store, a_series(store))
    cancelled = store.cancel(timer.id, NOW_MS + 5)
    assert (cancelled.state, cancelled.claim_token) == (State.CANCELLED, None)
    late = outcome_for(timer, State.PENDING, next_due_at_ms=NOW_MS + 60_000, next_occurrence=2)
    assert store.complete([late]) == 0
    paused = store.pause(a_series(store).id)
    assert store.cancel(paused.id, NOW_MS).state is State.CANCELLED


def test_update_pending_changes_a_series_schedule_and_restarts_its_occurrence(
    store: Store,
) -> None:
    timer = claimed(store, a_series(store))
    retry = outcome_for(timer, State.PENDING, status=503, next_due_at_ms=NOW_MS + 1000)
    store.complete([retry])
    new = SCHEDULE.replace("60000", "5000")
    changed = store.update_pending(timer.id, TimerChanges(due_at_ms=NOW_MS + 5000, schedule=new))
    assert (changed.schedule, changed.due_at_ms, changed.occurrence_at_ms, changed.attempts) == (
        new,
        NOW_MS + 5000,
        NOW_MS + 5000,
        0,
    )
    paused = store.pause(timer.id)
    assert store.update_pending(paused.id, TimerChanges(url=URL + "/2")).url == URL + "/2"


def test_the_sweep_never_ends_a_series(store: Store) -> None:
    timer = claimed(store, a_series(store, max_attempts=1))
    assert store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 1) == 1
    after = store.get(timer.id)
    assert (after.state, after.last_error) == (State.PENDING, CLAIM_EXPIRED)


def test_count_series_counts_live_series_only(store: Store) -> None:
    inserted(store)
    a_series(store)
    store.pause(a_series(store).id)
    store.cancel(a_series(store).id, NOW_MS)
    assert store.count_series() == 2


def test_list_timers_filters_series(store: Store) -> None:
    one_off = inserted(store)
    first, second = a_series(store), a_series(store)
    assert store.list_timers(None, None, 10, recurring=True) == [second, first]
    assert store.list_timers(None, None, 10, recurring=False) == [one_off]
    assert store.list_timers(None, None, 10, "", recurring=True) == [second, first]


# reads for the console


def test_count_by_state_of_counts_one_tenants_timers(store: Store) -> None:
    in_every_state(store)  # the anonymous tenant's
    inserted(store, tenant="acme")
    inserted(store, tenant="acme", state=State.FAILED)
    inserted(store, tenant="acme", state=State.FAILED)
    none = dict.fromkeys(State, 0)
    assert store.count_by_state_of("acme", 10) == none | {State.PENDING: 1, State.FAILED: 2}
    assert store.count_by_state_of("acme", 1) == none | {State.PENDING: 1, State.FAILED: 1}
    assert store.count_by_state_of("", 10) == dict.fromkeys(State, 1)
    assert store.count_by_state_of("globex", 10) == none


def test_earliest_pending_of_is_the_tenants_earliest_pending_timer(store: Store) -> None:
    assert store.earliest_pending_of("acme") is None
    inserted(store, NOW_MS - 9_000)  # another tenant's, earlier
    inserted(store, NOW_MS - 8_000, tenant="acme", state=State.FAILED)  # not pending
    later = inserted(store, NOW_MS + 5_000, tenant="acme")
    earliest = inserted(store, NOW_MS - 1_000, tenant="acme")
    assert store.earliest_pending_of("acme") == Due(earliest.id, earliest.due_at_ms, URL)
    store.cancel(earliest.id, NOW_MS)
    assert store.earliest_pending_of("acme") == Due(later.id, later.due_at_ms, URL)


def test_list_timers_by_url_pages_newest_first_through_a_bounded_scan(store: Store) -> None:
    hosts = ["https://a.example/x", "https://b.example/y", "https://a.example/z"] * 4
    timers = [inserted(store, url=url, tenant="acme") for url in hosts]
    inserted(store, url=hosts[0])  # another tenant's
    newest_first = sorted(timers, key=lambda t: t.id, reverse=True)
    wanted = [t for t in newest_first if t.url.startswith("https://a.example/")]

    def page(before_id: str | None, limit: int, scan: int) -> tuple[list[Timer], str | None]:
        return store.list_timers_by_url(
            "https://a.example/", None, before_id, limit, tenant="acme", scan=scan
        )

    assert page(None, 100, 100) == (wanted, None)  # all of them, nothing older left
    first, cursor = page(None, 3, 100)  # `limit` found: the cursor is the last one's id
    assert (first, cursor) == (wanted[:3], wanted[2].id)
    assert page(cursor, 100, 100) == (wanted[3:], None)
    scanned, cursor = page(None, 100, 5)  # the scan stops at 5 timers, then goes on
    assert scanned == [t for t in newest_first[:5] if t in wanted]
    assert cursor == newest_first[4].id
    assert page(cursor, 100, 100)[0] == [t for t in newest_first[5:] if t in wanted]
    everyone, _ = store.list_timers_by_url(
        "https://a.example/x", None, None, 10, tenant=None, scan=100
    )
    assert len(everyone) == 5  # without a tenant, the other tenant's timer too


def test_list_timers_by_url_matches_a_literal_prefix_in_one_state(store: Store) -> None:
    plain = inserted(store, url="https://a.example/h.x", state=State.FAILED)
    inserted(store, url="https://a.example/hax", state=State.FAILED)  # "." is no wildcard
    inserted(store, url="https://a.example/h.x")  # pending
    found = store.list_timers_by_url(
        "https://a.example/h.", State.FAILED, None, 10, tenant=None, scan=100
    )
    assert found == ([plain], None)
    assert store.list_timers_by_url("https://", None, None, 0, tenant=None, scan=10) == ([], None)
