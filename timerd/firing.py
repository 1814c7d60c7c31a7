"""The deliveries under way: each claimed timer is delivered once, its outcome judged
(`outcomes.judge`) and queued for the outcome writer, and its host slot given back.

Whatever a delivery raises becomes a failed attempt, so no claim is ever left to expire
unreported; a claim that can no longer cover a delivery is released, not delivered.

An attempt that did not deliver is logged (`delivery`, at info); one that delivered only at
debug, and in the `deliveries` summary the daemon logs each minute (`Tally`). A line per
delivery at info would be 86 million lines a day at 1,000 fires/s, and past journald's default
rate limit (10,000 lines a service per 30 s, times at most 6 for free disk) the journal drops
every further line of the interval, warnings included.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

import structlog

from timerd import metrics
from timerd.delivery import Attempt
from timerd.models import Outcome, State, Timer
from timerd.outcomes import OutcomeWriter, judge
from timerd.retry import RetryPolicy

log = structlog.get_logger("timerd.daemon")

Deliver = Callable[[Timer], Awaitable[Attempt]]


@dataclass(slots=True)
class Tally:
    """The attempts that ended since the last summary, by what they came to, and the latest
    start of one (past its due time)."""

    delivered: int = 0
    retrying: int = 0  # not delivered; another attempt will follow
    failed: int = 0  # not delivered; the timer (or a series' occurrence) gave up
    late_ms_max: int = 0

    def add(self, attempt: Attempt, outcome: Outcome, late_ms: int) -> None:
        """Count one attempt that ended."""
        if attempt.delivered:
            self.delivered += 1
        elif outcome.state is State.FAILED or outcome.occurrence_failed:
            self.failed += 1
        else:
            self.retrying += 1
        self.late_ms_max = max(self.late_ms_max, late_ms)

    def take(self) -> dict[str, int]:
        """The counts as log fields, and start again from zero."""
        counts: dict[str, int] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in counts:
            setattr(self, name, 0)
        return counts


class Deliveries:
    """Starts deliveries in a task group and keeps track of those under way."""

    def __init__(
        self,
        deliver: Deliver,
        outcomes: OutcomeWriter,
        retry: RetryPolicy,
        *,
        now_ms: Callable[[], int],
        in_time: Callable[[int], bool],
        on_done: Callable[[str], None],
    ) -> None:
        """`in_time(claimed_until_ms)` says whether a claim still covers a delivery started
        now; `on_done(host)` hears of each delivery that ended, with the host of its slot."""
        self._deliver = deliver
        self._outcomes = outcomes
        self._retry = retry
        self._now_ms = now_ms
        self._in_time = in_time
        self._on_done = on_done
        self._inflight: set[asyncio.Task[None]] = set()
        self.tally = Tally()

    def __len__(self) -> int:
        return len(self._inflight)

    def start(self, tasks: asyncio.TaskGroup, timer: Timer, host: str) -> None:
        """Deliver a claimed timer in `tasks`; `host` is the slot its entry took (a PATCH may
        have moved its url since it was read)."""
        task = tasks.create_task(self._fire(timer))
        self._inflight.add(task)
        task.add_done_callback(functools.partial(self._done, host))

    def _done(self, host: str, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._on_done(host)

    async def settled(self) -> None:
        """Return once every delivery started so far has ended."""
        await asyncio.gather(*self._inflight)

    async def drain(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the deliveries under way; cancel (and so release) the rest."""
        if not self._inflight:
            return
        log.info("draining", inflight=len(self._inflight), grace_s=grace_s)
        _, late = await asyncio.wait(self._inflight, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
            log.warning("drain_cut_short", released=len(late))

    async def _fire(self, timer: Timer) -> None:
        """Deliver a claimed timer once and queue its outcome."""
        assert timer.claimed_until_ms is not None
        if not self._in_time(timer.claimed_until_ms):  # the loop stalled since the claim
            self._release(timer, "claim too late to deliver")
            return
        try:
            attempt = await self._deliver(timer)
        except asyncio.CancelledError:
            self._release(timer, "released at shutdown")
            raise
        except Exception as exc:
            log.warning("delivery_raised", timer_id=timer.id, exc_info=exc)
            attempt = Attempt(self._now_ms(), 0.0, error=type(exc).__name__)
        outcome = judge(timer, attempt, self._retry, self._now_ms())
        self._outcomes.put(outcome)
        _observe(timer, attempt, outcome)
        late_ms = attempt.started_at_ms - timer.due_at_ms
        self.tally.add(attempt, outcome, late_ms)
        (log.debug if attempt.delivered else log.info)(
            "delivery",
            timer_id=timer.id,
            attempt=timer.attempts,
            outcome=outcome.state.value,
            status=attempt.status,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            late_ms=late_ms,
            next_due_at_ms=outcome.next_due_at_ms,
        )

    def _release(self, timer: Timer, why: str) -> None:
        """Hand a claim whose delivery was cut short (or never started) back to pending, to
        fire again at once."""
        assert timer.claim_token is not None
        self._outcomes.put(
            Outcome(
                timer_id=timer.id,
                claim_token=timer.claim_token,
                state=State.PENDING,
                at_ms=self._now_ms(),
                error=why,
                next_due_at_ms=timer.due_at_ms,
            )
        )


def _observe(timer: Timer, attempt: Attempt, outcome: Outcome) -> None:
    metrics.DELIVERIES_BY_STATE[outcome.state].inc()
    metrics.DELIVERY_LATENCY.observe(attempt.latency_ms / 1000)
    metrics.LATENESS.observe(max(0, attempt.started_at_ms - timer.due_at_ms) / 1000)
