"""What a delivery attempt comes to (`judge`), and writing those outcomes back in batches.

At thousands of deliveries a second one write per outcome would cost more than the deliveries;
outcomes that arrive while a write is under way go together in the next one.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from timerd.backoff import Backoff
from timerd.delivery import Attempt
from timerd.errors import StoreUnavailable
from timerd.models import AttemptRecord, Outcome, State, Timer
from timerd.offload import Offload
from timerd.retry import RetryPolicy, Verdict, classify, parse_retry_after
from timerd.schedules import next_occurrence
from timerd.store import Store

log = structlog.get_logger("timerd.outcomes")

MAX_BATCH = 1000
GATHER_S = 0.005


def next_attempt(
    attempt: Attempt,
    policy: RetryPolicy,
    attempts_made: int,
    max_attempts: int | None,
    now_ms: int,
) -> tuple[Verdict, int | None]:
    """What an attempt's answer means, and when to try again: a retryable failure within the
    budget gets the schedule's delay (or the answer's `Retry-After`); otherwise None."""
    verdict = classify(attempt.status, permanent=attempt.permanent)
    if verdict is not Verdict.RETRY:
        return verdict, None
    retry_after_s = parse_retry_after(attempt.retry_after, attempt.started_at_ms)
    return verdict, policy.next_due_ms(attempts_made, max_attempts, now_ms, retry_after_s)


def judge(timer: Timer, attempt: Attempt, policy: RetryPolicy, now_ms: int) -> Outcome:
    """The outcome of an attempt on a claimed timer: fired, retry later, or failed for good;
    for a series, an occurrence that ended (delivered or failed for good) moves the series on to
    its next occurrence in the same outcome, unless the series is over. A failure of a timer
    with an `on_failure_url` also makes its callback due (`callback_occurrence`)."""
    assert timer.claim_token is not None, "only a claimed timer is delivered"
    verdict, next_due_ms = next_attempt(attempt, policy, timer.attempts, timer.max_attempts, now_ms)
    if verdict is Verdict.DELIVERED:
        state = State.FIRED
    else:
        state = State.PENDING if next_due_ms is not None else State.FAILED
    next_number = None
    if timer.recurring and state is not State.PENDING:  # the occurrence ended: the series goes on
        following = next_occurrence(timer, attempt.started_at_ms)
        if following is not None:
            next_number, next_due_ms = following
    occurrence_failed = timer.recurring and state is State.FAILED
    ended_failed = state is State.FAILED
    callback = timer.occurrence if ended_failed and timer.on_failure_url is not None else None
    if next_number is not None:
        state = State.PENDING
    record = AttemptRecord(
        attempt=timer.attempts,
        at_ms=attempt.started_at_ms,
        latency_ms=attempt.latency_ms,
        status=attempt.status,
        error=attempt.error,
        response=attempt.response,
    )
    return Outcome(
        timer_id=timer.id,
        claim_token=timer.claim_token,
        state=state,
        at_ms=attempt.started_at_ms,
        status=attempt.status,
        error=attempt.error,
        next_due_at_ms=next_due_ms,
        record=record,
        owner=timer.claimed_by,
        next_occurrence=next_number,
        occurrence_failed=occurrence_failed,
        callback_occurrence=callback,
    )


class OutcomeWriter:
    """Queues outcomes and writes them with `Store.complete`, retrying while the store is down
    (every outcome is conditional on its claim, so writing one twice changes nothing)."""

    def __init__(self, store: Store, offload: Offload) -> None:
        self._store = store
        self._offload = offload
        self._queue: list[Outcome] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        """Outcomes not written yet."""
        return len(self._queue)

    def put(self, outcome: Outcome) -> None:
        """Queue one outcome for the next write."""
        self._queue.append(outcome)
        self._idle.clear()
        self._ready.set()

    async def run(self) -> None:
        """Write queued outcomes until cancelled; store errors are retried with backoff."""
        backoff = Backoff()
        while True:
            await self._ready.wait()
            await asyncio.sleep(GATHER_S)  # let the outcomes of the next few ms join this write
            batch = self._queue[:MAX_BATCH]
            try:
                applied = await self._offload(functools.partial(self._store.complete, batch))
            except StoreUnavailable as exc:
                delay = backoff.next_s()
                log.warning("outcomes_store_unavailable", error=str(exc), queued=self.queued)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            del self._queue[: len(batch)]
            if applied < len(batch):
                log.debug("outcomes_superseded", ignored=len(batch) - applied)
            if not self._queue:
                self._ready.clear()
                self._idle.set()

    async def drained(self) -> None:
        """Return once every queued outcome has been written."""
        await self._idle.wait()
