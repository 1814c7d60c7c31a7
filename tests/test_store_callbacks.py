"""The store contract for failure callbacks (`on_failure_url`), on every backend: a failed
outcome makes the row's callback pending in the same write, and the callback is then claimed,
fenced by its token, completed, retried and recovered like a delivery of its own."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_store_contract import (
    CLAIM_MS,
    NOW_MS,
    RACES_NEED_ATOMIC_WRITES,
    SCHEDULE,
    StoreFactory,
    a_claim,
    claimed,
    inserted,
    outcome_for,
    run_together,
)
from timerd.models import (
    CallbackOutcome,
    CallbackState,
    Claim,
    Due,
    State,
    Timer,
    TimerChanges,
    partition_of,
)
from timerd.store.base import CLAIM_EXPIRED, Store

HOOK = "https://ops.example/failed"


def failed_with_callback(store: Store, **fields: object) -> Timer:
    """A timer with an `on_failure_url`, claimed and then failed for good: its callback is
    pending, due at the failure's moment."""
    timer = claimed(store, inserted(store, on_failure_url=HOOK, **fields))
    failed = outcome_for(timer, State.FAILED, status=410, callback_occurrence=0)
    assert store.complete([failed]) == 1
    return store.get(timer.id)


def callback_claimed(store: Store, timer: Timer, claim: Claim | None = None) -> Timer:
    claim = claim or a_claim(now_ms=NOW_MS + 1_000)
    [got] = store.claim_callbacks([timer.id], claim)
    assert got == store.get(timer.id)
    return got


def callback_outcome(timer: Timer, state: CallbackState, **fields: object) -> CallbackOutcome:
    assert timer.callback_token is not None
    values: dict[str, object] = {"at_ms": NOW_MS + 2_000, "status": 200} | fields
    return CallbackOutcome(timer.id, timer.callback_token, state, **values)


def test_a_failure_makes_the_callback_pending_in_the_same_write(store: Store) -> None:
    timer = failed_with_callback(store)
    assert (timer.state, timer.callback_state, timer.callback_due_at_ms) == (
        State.FAILED,
        CallbackState.PENDING,
        NOW_MS + 250,
    )
    assert (timer.callback_attempts, timer.callback_occurrence) == (0, 0)
    assert store.callbacks_due(NOW_MS + 251, 10) == [Due(timer.id, NOW_MS + 250, HOOK)]
    assert store.callbacks_due(NOW_MS + 250, 10) == [], "due strictly before the bound"


def test_a_timer_without_on_failure_url_or_delivered_has_no_callback(store: Store) -> None:
    plain = claimed(store, inserted(store))
    store.complete([outcome_for(plain, State.FAILED, status=410)])
    fine = claimed(store, inserted(store, on_failure_url=HOOK))
    store.complete([outcome_for(fine, State.FIRED)])
    assert store.get(plain.id).callback_state is None
    assert store.get(fine.id).callback_state is None
    assert store.callbacks_due(NOW_MS + 10**9, 10) == []


def test_claim_callbacks_is_exclusive_and_counts_the_attempt(store: Store) -> None:
    timer = failed_with_callback(store)
    claim = a_claim(now_ms=NOW_MS + 1_000)
    got = callback_claimed(store, timer, claim)
    assert (got.callback_state, got.callback_token, got.callback_until_ms) == (
        CallbackState.FIRING,
        claim.token,
        claim.until_ms,
    )
    assert got.callback_attempts == 1
    assert store.claim_callbacks([timer.id], a_claim("leader-b", NOW_MS + 1_000)) == []
    assert store.callbacks_due(NOW_MS + 10**9, 10) == []


def test_a_callback_is_not_claimed_before_it_is_due(store: Store) -> None:
    timer = failed_with_callback(store)
    assert store.claim_callbacks([timer.id], a_claim(now_ms=NOW_MS)) == []


def test_complete_callbacks_is_fenced_by_the_claim_token(store: Store) -> None:
    timer = callback_claimed(store, failed_with_callback(store))
    stale = CallbackOutcome(timer.id, "not-the-token", CallbackState.DELIVERED, NOW_MS + 2_000)
    assert store.complete_callbacks([stale]) == 0
    done = callback_outcome(timer, CallbackState.DELIVERED)
    assert store.complete_callbacks([done]) == 1
    after = store.get(timer.id)
    assert (after.callback_state, after.callback_token, after.callback_status) == (
        CallbackState.DELIVERED,
        None,
        200,
    )
    assert store.complete_callbacks([done]) == 0, "applied twice"
    assert after.state is State.FAILED and after.history == timer.history


def test_a_callback_retry_is_due_again_and_a_failure_ends_it(store: Store) -> None:
    timer = callback_claimed(store, failed_with_callback(store))
    retry = callback_outcome(
        timer, CallbackState.PENDING, status=503, next_due_at_ms=NOW_MS + 9_000
    )
    assert store.complete_callbacks([retry]) == 1
    after = store.get(timer.id)
    assert (after.callback_state, after.callback_due_at_ms, after.callback_status) == (
        CallbackState.PENDING,
        NOW_MS + 9_000,
        503,
    )
    again = callback_claimed(store, after, a_claim(now_ms=NOW_MS + 9_000))
    assert again.callback_attempts == 2
    gone = callback_outcome(again, CallbackState.FAILED, status=None, error="timeout")
    assert store.complete_callbacks([gone]) == 1
    final = store.get(timer.id)
    assert (final.callback_state, final.callback_error, final.callback_status) == (
        CallbackState.FAILED,
        "timeout",
        None,
    )


def test_an_expired_callback_claim_returns_to_pending(store: Store) -> None:
    timer = callback_claimed(store, failed_with_callback(store))
    assert store.recover_expired_callbacks(NOW_MS + 1_000 + CLAIM_MS, 10) == 0, "not expired"
    mine = partition_of(timer.id, store.partitions())
    other = (mine + 1) % store.partitions()
    assert store.recover_expired_callbacks(NOW_MS + 1_001 + CLAIM_MS, 10, [other]) == 0
    assert store.recover_expired_callbacks(NOW_MS + 1_001 + CLAIM_MS, 10, [mine]) == 1
    after = store.get(timer.id)
    assert (after.callback_state, after.callback_token, after.callback_error) == (
        CallbackState.PENDING,
        None,
        CLAIM_EXPIRED,
    )
    late = callback_outcome(timer, CallbackState.DELIVERED)
    assert store.complete_callbacks([late]) == 0, "the expired claim's outcome is fenced off"


def test_a_series_failed_occurrence_names_its_callback_and_the_series_goes_on(
    store: Store,
) -> None:
    series = inserted(
        store,
        schedule=SCHEDULE,
        occurrence=3,
        occurrence_at_ms=NOW_MS,
        on_failure_url=HOOK,
    )
    timer = claimed(store, series)
    failed = outcome_for(
        timer,
        State.PENDING,
        status=410,
        next_due_at_ms=NOW_MS + 60_000,
        next_occurrence=4,
        occurrence_failed=True,
        callback_occurrence=3,
    )
    assert store.complete([failed]) == 1
    after = store.get(timer.id)
    assert (after.state, after.occurrence, after.callback_state, after.callback_occurrence) == (
        State.PENDING,
        4,
        CallbackState.PENDING,
        3,
    )


def test_a_claim_expiring_past_the_budget_schedules_the_callback(store: Store) -> None:
    timer = claimed(store, inserted(store, on_failure_url=HOOK, max_attempts=1))
    assert store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5) == 1
    after = store.get(timer.id)
    assert (after.state, after.callback_state, after.callback_due_at_ms) == (
        State.FAILED,
        CallbackState.PENDING,
        NOW_MS + CLAIM_MS + 1,
    )
    plain = claimed(store, inserted(store, max_attempts=1))
    store.recover_expired(NOW_MS + CLAIM_MS + 1, 10, 5)
    assert store.get(plain.id).callback_state is None


def test_on_failure_url_round_trips_and_changes(store: Store) -> None:
    timer = inserted(store, on_failure_url=HOOK)
    assert store.get(timer.id) == timer
    changed = store.update_pending(timer.id, TimerChanges(on_failure_url=HOOK + "/2"))
    assert changed.on_failure_url == HOOK + "/2"
    assert dataclasses.replace(changed, on_failure_url=HOOK) == timer


def test_purge_keeps_a_finished_timer_until_its_callback_is_settled(store: Store) -> None:
    timer = failed_with_callback(store)
    assert store.purge_finished(NOW_MS + 10**6, 10) == 0
    claimed_one = callback_claimed(store, timer)
    assert store.purge_finished(NOW_MS + 10**6, 10) == 0
    store.complete_callbacks([callback_outcome(claimed_one, CallbackState.DELIVERED)])
    assert store.purge_finished(NOW_MS + 10**6, 10) == 1


@pytest.fixture
def racing_store(backend: str, open_store_on_backend: StoreFactory) -> StoreFactory:
    if backend == "mongomock":
        pytest.skip(RACES_NEED_ATOMIC_WRITES)
    return open_store_on_backend


def test_concurrent_callback_claims_never_both_win(racing_store: StoreFactory) -> None:
    stores = [racing_store() for _ in range(2)]
    timers = [failed_with_callback(stores[0]) for _ in range(6)]
    ids = [t.id for t in timers]
    claims = [a_claim(f"daemon-{n}", NOW_MS + 1_000) for n in range(4)]
    results = run_together(
        [
            lambda s=stores[n % 2], c=claim: s.claim_callbacks(ids, c)
            for n, claim in enumerate(claims)
        ]
    )
    won = [t.id for result in results for t in result]
    assert sorted(won) == sorted(ids), "each callback claimed exactly once"
