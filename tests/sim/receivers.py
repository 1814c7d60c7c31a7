"""Simulated webhook receivers, and the ledger of every delivery they saw.

A receiver answers by the run's RNG: 2xx, 4xx (410 among them), 5xx, 429 with a `Retry-After`
(seconds, an HTTP date, or garbage), a reset connection, a hang until the delivery timeout, a
slow answer, or the `deliver` callable itself raises something unexpected. Every delivery is
written in the ledger on the true clock, so invariants can compare it with the store.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from tests.sim.loop import TrueClock
from timerd.clock import Clock
from timerd.delivery import Attempt
from timerd.models import Timer

Deliver = Callable[[Timer], Awaitable[Attempt]]
MARKER = "sim-delivery-"  # the answer's body: ties a history record to its ledger entry

UNEXPECTED: tuple[type[Exception], ...] = (UnicodeError, ValueError, RuntimeError, KeyError)
GARBAGE_RETRY_AFTER = ("²", "soon", "-3", "1.5", "", " 7 ", "Wed, 99 Foo 2026", "1" * 20, "٣")


@dataclass(slots=True)
class Delivery:
    """One delivery as the receiver saw it; times on the true clock (ms)."""

    seq: int
    timer_id: str
    actor: str
    attempt: int  # the claimed timer's `attempts`
    due_at_ms: int  # as claimed
    claimed_until_ms: int | None  # the claim's deadline
    start_ms: int
    end_ms: int | None = None
    kind: str = "open"
    status: int | None = None
    error: str | None = None
    raised: str | None = None
    not_before_ms: int | None = None  # a valid Retry-After asked for no retry before this

    @property
    def marker(self) -> str:
        return f"{MARKER}{self.seq}"

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def overlaps(self, other: Delivery, now_ms: int) -> bool:
        end = self.end_ms if self.end_ms is not None else now_ms
        other_end = other.end_ms if other.end_ms is not None else now_ms
        return self.start_ms <= other_end and other.start_ms <= end

    def describe(self) -> str:
        what = self.raised or self.error or self.status
        return (
            f"#{self.seq} {self.timer_id[-6:]} by {self.actor} attempt {self.attempt}"
            f" [{self.start_ms}..{self.end_ms}] {self.kind} {what}"
        )


class Ledger:
    """Every delivery of the run, and the violations seen while they happened."""

    def __init__(self, true: TrueClock, early_tolerance_ms: int = 0) -> None:
        self._true = true
        self.early_tolerance_ms = early_tolerance_ms
        self.deliveries: list[Delivery] = []
        self.by_timer: dict[str, list[Delivery]] = {}
        self.early: list[str] = []

    def open(self, timer: Timer, actor: str, clock_error_ms: int) -> Delivery:
        """A delivery starts; `clock_error_ms` is how far the daemon's judging clock is ahead
        of the true one (for the report of an early delivery)."""
        d = Delivery(
            seq=len(self.deliveries) + 1,
            timer_id=timer.id,
            actor=actor,
            attempt=timer.attempts,
            due_at_ms=timer.due_at_ms,
            claimed_until_ms=timer.claimed_until_ms,
            start_ms=self._true.now_ms(),
        )
        if d.start_ms + self.early_tolerance_ms < timer.due_at_ms:
            self.early.append(
                f"{d.describe()}: {timer.due_at_ms - d.start_ms} ms before due"
                f" (its daemon's clock is {clock_error_ms} ms ahead of the true one)"
            )
        self.deliveries.append(d)
        self.by_timer.setdefault(timer.id, []).append(d)
        return d

    def close(self, d: Delivery, kind: str, status: int | None = None, **fields: str) -> None:
        d.end_ms = self._true.now_ms()
        d.kind = kind
        d.status = status
        d.error = fields.get("error")
        d.raised = fields.get("raised")


@dataclass(frozen=True, slots=True)
class Answer:
    """What a receiver does with one delivery."""

    kind: str
    delay_s: float
    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    raises: type[Exception] | None = None
    not_before_s: float | None = None  # true seconds (epoch) before which a retry is unwelcome


class Receivers:
    """The webhook targets of the world: one behaviour table, drawn from per delivery."""

    def __init__(
        self,
        rng: random.Random,
        true: TrueClock,
        ledger: Ledger,
        *,
        delivery_timeout_s: float,
        trace: Callable[[str], None],
    ) -> None:
        self.rng = rng
        self.true = true
        self.ledger = ledger
        self.timeout_s = delivery_timeout_s
        self.quiet = False  # answer 2xx at once, from the quiet phase on
        # This seed's receivers: how much more or less of each kind of answer than usual.
        profile = random.Random(rng.random())
        self.mix = [profile.choice((0.0, 0.5, 1.0, 1.0, 2.0, 4.0)) for _ in self._table()]
        self.mix[0] = max(self.mix[0], 0.5)  # some deliveries always succeed
        self._trace = trace

    def answer(self) -> Answer:
        """Draw what the receiver does with the next delivery."""
        if self.quiet:
            return Answer("2xx", self.rng.uniform(0.001, 0.05), status=200)
        table = [(w * m, make) for (w, make), m in zip(self._table(), self.mix, strict=True)]
        pick = self.rng.uniform(0, sum(weight for weight, _ in table))
        for weight, make in table:
            pick -= weight
            if pick <= 0:
                return make()
        return table[0][1]()

    def _table(self) -> list[tuple[float, Callable[[], Answer]]]:
        rng, timeout_s = self.rng, self.timeout_s
        return [
            (50, lambda: Answer("2xx", rng.uniform(0.001, 0.2), status=rng.choice((200, 204)))),
            (10, lambda: Answer("5xx", rng.uniform(0.001, 0.3), status=rng.choice((500, 503)))),
            (8, lambda: self._too_many(rng.uniform(0.001, 0.1))),
            (4, lambda: Answer("4xx", rng.uniform(0.001, 0.1), status=rng.choice((400, 410)))),
            (8, lambda: Answer("reset", rng.uniform(0, 0.05), error="ClientConnectionError")),
            (5, lambda: Answer("hang", timeout_s, error="timeout")),
            (7, lambda: Answer("slow", rng.uniform(0.5, timeout_s * 0.9), status=200)),
            (8, lambda: Answer("raise", rng.uniform(0, 0.1), raises=rng.choice(UNEXPECTED))),
        ]

    def _too_many(self, delay_s: float) -> Answer:
        """429 with a Retry-After of seconds, an HTTP date, or garbage (which asks nothing)."""
        pick = self.rng.random()
        answered_s = self.true.now_ms() / 1000 + delay_s
        if pick < 0.4:
            seconds = self.rng.randint(0, 6)
            return Answer("429", delay_s, 429, None, str(seconds), None, answered_s + seconds)
        if pick < 0.7:
            moment_s = int(answered_s) + self.rng.randint(-5, 8)
            header = format_datetime(datetime.fromtimestamp(moment_s, tz=UTC), usegmt=True)
            return Answer("429", delay_s, 429, None, header, None, moment_s)
        return Answer("429", delay_s, 429, None, self.rng.choice(GARBAGE_RETRY_AFTER))

    def deliver_for(
        self,
        actor: str,
        stamping_clock: Callable[[], Clock],
        gate: Callable[[], Awaitable[None]],
        judging_clock: Callable[[], Clock],
    ) -> Deliver:
        """The `deliver` callable of one daemon: `stamping_clock` gives the clock attempts are
        stamped with, `gate` waits while its process is stopped, `judging_clock` gives the
        clock the daemon judges due times by."""

        async def deliver(timer: Timer) -> Attempt:
            await gate()
            loop = asyncio.get_running_loop()
            started_s = loop.time()
            started_ms = stamping_clock().now_ms()
            error_ms = judging_clock().now_ms() - self.true.now_ms()
            d = self.ledger.open(timer, actor, error_ms)
            a = self.answer()
            self._trace(f"{actor} deliver {d.describe()} -> {a.kind}")
            try:
                await asyncio.sleep(a.delay_s)
            except asyncio.CancelledError:
                self.ledger.close(d, "cancelled")
                raise
            if a.raises is not None:
                self.ledger.close(d, "raise", raised=a.raises.__name__)
                raise a.raises(f"simulated {a.raises.__name__} in the deliver callable")
            self.ledger.close(d, a.kind, a.status, error=a.error or "")
            if d.error == "":
                d.error = None
            if a.not_before_s is not None:
                d.not_before_ms = int(a.not_before_s * 1000)
            await gate()  # a stopped process reads the answer only once it runs again
            return Attempt(
                started_at_ms=started_ms,
                latency_ms=round((loop.time() - started_s) * 1000, 3),
                status=a.status,
                error=a.error,
                retry_after=a.retry_after,
                response=d.marker if a.status is not None else None,
            )

        return deliver
