"""Failure callbacks (`on_failure_url`): a follow-up delivery carried by the timer's own row.

When a timer, or an occurrence of a series, ends `failed` and the timer has an
`on_failure_url`, the write that records that outcome also makes the row's callback `pending`
(`Store.complete`, `Store.recover_expired`). The daemon then fires callbacks as it fires timers,
for the partitions it holds: read the due ones (`Store.callbacks_due`, a partial index over
pending callbacks), claim them under a fresh token (`Store.claim_callbacks`), deliver through the
same `Deliverer` (SSRF guard, signing), judge the attempt with the same retry policy, and write
the outcome conditional on that token (`Store.complete_callbacks`). A claim whose daemon died is
returned to pending by the sweep (`Store.recover_expired_callbacks`): at least once, never lost.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from timerd.backoff import Backoff
from timerd.clock import Clock
from timerd.delivery import Attempt
from timerd.errors import StoreUnavailable
from timerd.hosts import host_of
from timerd.models import (
    CallbackOutcome,
    CallbackState,
    Claim,
    Timer,
    new_claim_token,
    partition_scope,
)
from timerd.offload import Offload
from timerd.outcomes import next_attempt
from timerd.retry import RetryPolicy, Verdict
from timerd.settings import Settings
from timerd.store import Store

log = structlog.get_logger("timerd.callbacks")

DeliverCallback = Callable[[Timer], Awaitable[Attempt]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]
WRITE_TRIES = 5  # an outcome the store refuses this often is left to the sweep


def judge_callback(
    timer: Timer, attempt: Attempt, policy: RetryPolicy, now_ms: int
) -> CallbackOutcome:
    """Delivered on 2xx, retried by the retry schedule, failed for good otherwise."""
    assert timer.callback_token is not None, "only a claimed callback is delivered"
    verdict, next_due_ms = next_attempt(attempt, policy, timer.callback_attempts, None, now_ms)
    if verdict is Verdict.DELIVERED:
        state = CallbackState.DELIVERED
    else:
        state = CallbackState.PENDING if next_due_ms is not None else CallbackState.FAILED
    return CallbackOutcome(
        timer_id=timer.id,
        claim_token=timer.callback_token,
        state=state,
        at_ms=attempt.started_at_ms,
        status=attempt.status,
        error=attempt.error,
        next_due_at_ms=next_due_ms,
    )


class CallbackFirer:
    """Claims and fires the due callbacks of the partitions `held()` returns; `tick` is called
    by the daemon every poll interval, `spawn` starts a delivery in the daemon's task group."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        deliver: DeliverCallback,
        *,
        clock: Clock,
        offload: Offload,
        holder: str,
        held: Callable[[], list[int]],
        partitions: int,
        spawn: Spawn,
    ) -> None:
        self._settings = settings
        self._store = store
        self._deliver = deliver
        self._clock = clock
        self._offload = offload
        self._holder = holder
        self._held = held
        self._partitions = partitions
        self._spawn = spawn
        self._retry = RetryPolicy.from_setting(settings.retry_schedule)
        self._inflight: set[str] = set()
        self._hosts: dict[str, int] = {}  # callbacks in flight per host

    @property
    def inflight(self) -> int:
        """Callbacks being delivered now."""
        return len(self._inflight)

    def _scope(self) -> list[int] | None:
        return partition_scope(self._held(), self._partitions)

    async def tick(self) -> None:
        """Claim the due callbacks (up to a batch) whose host has a free slot, and start
        their deliveries: a claim is made only for a callback that can go at once."""
        if not self._held():
            return
        now_ms = self._clock.now_ms()
        read = functools.partial(
            self._store.callbacks_due, now_ms + 1, self._settings.batch_size, self._scope()
        )
        wanted: dict[str, int] = {}
        ids = []
        for due in await self._offload(read):
            host = host_of(due.url)
            busy = self._hosts.get(host, 0) + wanted.get(host, 0)
            if due.id in self._inflight or busy >= self._settings.per_host_concurrency:
                continue
            wanted[host] = wanted.get(host, 0) + 1
            ids.append(due.id)
        if not ids:
            return
        claim = Claim(self._holder, now_ms, now_ms + self._settings.claim_ttl_ms, new_claim_token())
        claimed = await self._offload(functools.partial(self._store.claim_callbacks, ids, claim))
        for timer in claimed:
            assert timer.on_failure_url is not None
            host = host_of(timer.on_failure_url)
            self._hosts[host] = self._hosts.get(host, 0) + 1
            self._inflight.add(timer.id)
            self._spawn(self._fire(timer, host))

    async def recover_expired(self) -> None:
        """Return callbacks whose claim expired (their daemon died) to pending."""
        if not self._held():
            return
        call = functools.partial(
            self._store.recover_expired_callbacks,
            self._clock.now_ms(),
            self._settings.batch_size,
            self._scope(),
        )
        n = await self._offload(call)
        if n:
            log.warning("callback_claims_recovered", count=n)

    async def _fire(self, timer: Timer, host: str) -> None:
        try:
            assert timer.callback_until_ms is not None and timer.callback_token is not None
            if not self._settings.covers_delivery(timer.callback_until_ms, self._clock.now_ms()):
                now_ms = self._clock.now_ms()
                late = CallbackState.PENDING
                error = "claim too late to deliver"
                await self._write(
                    CallbackOutcome(
                        timer.id, timer.callback_token, late, now_ms, None, error, now_ms
                    )
                )
                return
            attempt = await self._deliver(timer)
            outcome = judge_callback(timer, attempt, self._retry, self._clock.now_ms())
            log.info(
                "callback",
                timer_id=timer.id,
                attempt=timer.callback_attempts,
                outcome=outcome.state.value,
                status=attempt.status,
                error=attempt.error,
            )
            await self._write(outcome)
        finally:
            self._inflight.discard(timer.id)
            self._hosts[host] -= 1
            if not self._hosts[host]:
                del self._hosts[host]

    async def _write(self, outcome: CallbackOutcome) -> None:
        backoff = Backoff()
        for _ in range(WRITE_TRIES):
            try:
                await self._offload(functools.partial(self._store.complete_callbacks, [outcome]))
                return
            except StoreUnavailable as exc:
                log.warning("callback_outcome_unwritten", error=str(exc))
                await asyncio.sleep(backoff.next_s())
        # left firing: the sweep returns it to pending once its claim expires (at least once)
