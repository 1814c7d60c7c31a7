"""The firing daemon: one leader claims due timers at their instant and fires them.

The leader reads the pending timers due within `lookahead_s` (never claiming them yet) into a
small heap, sleeps until the earliest is due, a poll is due, or news arrives, then claims what
is due in one conditional write and starts exactly those deliveries. Memory holds at most one
batch of due times, whatever the backlog. Housekeeping (lease ticks, the recovery sweep) runs on
an APScheduler schedule beside the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from timerd import metrics, systemd
from timerd.clock import Clock, SystemClock
from timerd.delivery import Attempt
from timerd.errors import StoreUnavailable
from timerd.hosts import Entry, HostSlots, host_of
from timerd.lease import LeaseKeeper, daemon_identity
from timerd.models import AttemptRecord, Claim, Outcome, State, Timer
from timerd.outcomes import RETRY_DELAYS_S, OutcomeWriter
from timerd.retry import RetryPolicy, Verdict, classify, parse_retry_after
from timerd.settings import Settings
from timerd.store import Store

log = structlog.get_logger("timerd.daemon")

Deliver = Callable[[Timer], Awaitable[Attempt]]

MAX_PAGES_PER_POLL = 4  # of the due index read past parked hosts' timers in one poll
CLAIM_COALESCE_S = 0.002  # when few slots are free, wait this long for more before claiming


class Daemon:
    """Fires the timers of one store while it holds the leader lease."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        deliver: Deliver,
        *,
        clock: Clock | None = None,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock or SystemClock()
        self.lease = LeaseKeeper(
            store,
            self.clock,
            holder or daemon_identity(),
            settings.lease_ttl_s,
            settings.lease_renew_s,
        )
        self.outcomes = OutcomeWriter(store)
        self._deliver = deliver
        self.retry = RetryPolicy.from_setting(settings.retry_schedule)
        self._window: list[Entry] = []  # heap of (due_at_ms, id, host): the lookahead window
        self._window_full = False  # the last poll hit batch_size: more may be due behind it
        self._heard: list[Entry] = []  # inserts announced while a poll was under way
        self._hosts = HostSlots(settings.per_host_concurrency, settings.batch_size)
        self._polling = False
        self._next_poll_s = 0.0
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._slots_wanted = 0
        self._stopping = False
        self._store_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set once running
        metrics.IN_FLIGHT.set_function(lambda: len(self._inflight))
        metrics.LEADER.set_function(lambda: int(self.lease.is_leader()))
        metrics.LEASE_EPOCH.set_function(lambda: self.lease.epoch)

    # public surface

    def stop(self) -> None:
        """Ask the daemon to stop: no new claims; in-flight deliveries drain (see `run`)."""
        if not self._stopping:
            systemd.notify("STOPPING=1")
        self._stopping = True
        self._wake.set()

    def notify_insert(self, timer: Timer) -> None:
        """Hear of a timer just created or moved in this process, so that one due sooner than
        the next poll fires on time. Safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._consider, timer)

    def _consider(self, timer: Timer) -> None:
        if timer.due_at_ms < self.clock.now_ms() + self.settings.lookahead_s * 1000:
            entry = (timer.due_at_ms, timer.id, host_of(timer.url))
            heapq.heappush(self._window, entry)
            if self._polling:
                self._heard.append(entry)
            self._wake.set()

    @property
    def inflight(self) -> int:
        """Deliveries under way."""
        return len(self._inflight)

    async def run(self) -> None:
        """Run until `stop()`: keep the lease, fire due timers, then drain and release."""
        scheduler = self._housekeeping()
        writer = asyncio.create_task(self.outcomes.run(), name="timerd-outcomes")
        scheduler.start()
        log.info("daemon_started", holder=self.lease.holder)
        try:
            await self.lease.tick()
            systemd.notify("READY=1")
            while not self._stopping:
                await self._sleep(await self._safe_step())
        finally:
            scheduler.shutdown(wait=False)
            await self._drain()
            await self._flush_outcomes(writer)
            await self.lease.release()
            log.info("daemon_stopped", holder=self.lease.holder)

    # the hot path

    async def step(self) -> float:
        """Do what is due now; return how many seconds may pass before the next step."""
        self._loop = asyncio.get_running_loop()
        if not self.lease.is_leader():
            self._forget_window()
            return self.settings.poll_interval_s
        if self._poll_is_due():
            await self._poll()
        now_ms = self.clock.now_ms()
        if not self._window or self._window[0][0] > now_ms:
            return self._idle_s(now_ms)
        free = self.settings.concurrency - len(self._inflight)
        if free < min(self._claim_min(), len(self._window)) and self._inflight:
            self._slots_wanted = self._claim_min()
            return CLAIM_COALESCE_S if free else self.settings.poll_interval_s
        await self._claim_and_fire(self._take_due(now_ms, free), now_ms)
        return 0.0

    def _claim_min(self) -> int:
        return max(1, min(self.settings.concurrency // 4, 64))

    def _poll_is_due(self) -> bool:
        drained = not self._window and self._window_full and not self._hosts.parked
        return drained or self.clock.monotonic_s() >= self._next_poll_s

    def _forget_window(self) -> None:
        self._window.clear()
        self._hosts.clear_parked()
        self._next_poll_s = 0.0

    async def _poll(self) -> None:
        self._polling = True
        try:
            entries, full = await self._read_window()
        finally:
            self._polling = False
        self._window = entries + self._heard
        heapq.heapify(self._window)
        self._heard = []
        self._window_full = full
        self._next_poll_s = self.clock.monotonic_s() + self.settings.poll_interval_s

    async def _read_window(self) -> tuple[list[Entry], bool]:
        """Read the due index up to the lookahead horizon: the entries not parked already and
        not of hosts whose parking is full, reading on past those (a few pages at most) so one
        host's backlog cannot hide every other host's timers. Also says if more may be due."""
        horizon_ms = self.clock.now_ms() + int(self.settings.lookahead_s * 1000)
        batch = self.settings.batch_size
        entries: list[Entry] = []
        after: tuple[int, str] | None = None
        for _ in range(MAX_PAGES_PER_POLL):
            page = await asyncio.to_thread(self.store.pending_due, horizon_ms, batch, after)
            polled = ((d.due_at_ms, d.id, host_of(d.url)) for d in page)
            entries.extend(entry for entry in polled if self._hosts.wanted(entry))
            if len(page) < batch or len(entries) >= batch // 2:
                return entries, len(page) >= batch
            after = (page[-1].due_at_ms, page[-1].id)
        return entries, True

    def _idle_s(self, now_ms: int) -> float:
        until_poll_s = self._next_poll_s - self.clock.monotonic_s()
        if not self._window:
            return max(0.0, until_poll_s)
        return max(0.0, min(until_poll_s, (self._window[0][0] - now_ms) / 1000))

    def _take_due(self, now_ms: int, limit: int) -> list[Entry]:
        """Pop what is due, up to `limit`, taking a slot at each host; park what cannot go."""
        taken: list[Entry] = []
        limit = min(limit, self.settings.batch_size)
        while self._window and self._window[0][0] <= now_ms and len(taken) < limit:
            entry = heapq.heappop(self._window)
            if self._hosts.take(entry):
                taken.append(entry)
        return taken

    async def _claim_and_fire(self, entries: list[Entry], now_ms: int) -> None:
        if not self.lease.is_leader():
            for entry in entries:
                self._give_back(entry[2])
            return
        claim = Claim(
            owner=self.lease.holder,
            epoch=self.lease.epoch,
            now_ms=now_ms,
            until_ms=now_ms + self.settings.claim_ttl_ms,
        )
        unique = {entry[1]: entry for entry in entries}  # a poll and an announcement may agree
        ids = list(unique)
        claimed = await asyncio.to_thread(self.store.claim_due, ids, claim) if ids else []
        claimed_ids = {timer.id for timer in claimed}
        for entry in entries:
            if entry[1] not in claimed_ids or unique[entry[1]] is not entry:
                self._give_back(entry[2])  # not claimed (cancelled, moved, elsewhere) or twice
        if len(claimed) < len(ids):
            log.debug("claims_lost", wanted=len(ids), claimed=len(claimed))
        for timer in claimed:
            task = asyncio.create_task(self._fire(timer))
            self._inflight.add(task)
            # The slot is the entry's: a PATCH may have moved the url since it was read.
            host = unique[timer.id][2]
            task.add_done_callback(functools.partial(self._delivery_done, host))

    def _give_back(self, host: str) -> None:
        released = self._hosts.give_back(host)
        for entry in released:
            heapq.heappush(self._window, entry)
        if released:
            self._wake.set()

    def _delivery_done(self, host: str, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._give_back(host)
        free = self.settings.concurrency - len(self._inflight)
        if self._slots_wanted and free >= self._slots_wanted:
            self._slots_wanted = 0
            self._wake.set()

    async def _fire(self, timer: Timer) -> None:
        try:
            attempt = await self._deliver(timer)
        except asyncio.CancelledError:
            self._release(timer)
            raise
        outcome = self._judge(timer, attempt)
        self.outcomes.put(outcome)
        self._observe(timer, attempt, outcome)
        log.info(
            "delivery",
            timer_id=timer.id,
            attempt=timer.attempts,
            epoch=timer.epoch,
            outcome=outcome.state.value,
            status=attempt.status,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            late_ms=attempt.started_at_ms - timer.due_at_ms,
            next_due_at_ms=outcome.next_due_at_ms,
        )

    @staticmethod
    def _observe(timer: Timer, attempt: Attempt, outcome: Outcome) -> None:
        metrics.DELIVERIES_BY_STATE[outcome.state].inc()
        metrics.DELIVERY_LATENCY.observe(attempt.latency_ms / 1000)
        metrics.LATENESS.observe(max(0, attempt.started_at_ms - timer.due_at_ms) / 1000)

    def _judge(self, timer: Timer, attempt: Attempt) -> Outcome:
        """The outcome of an attempt: fired, retry later, or failed for good."""
        assert timer.epoch is not None
        verdict = classify(attempt.status, permanent=attempt.permanent)
        next_due_ms = None
        if verdict is Verdict.RETRY:
            retry_after_s = parse_retry_after(attempt.retry_after, attempt.started_at_ms)
            next_due_ms = self.retry.next_due_ms(
                timer.attempts, timer.max_attempts, self.clock.now_ms(), retry_after_s
            )
        if verdict is Verdict.DELIVERED:
            state = State.FIRED
        else:
            state = State.PENDING if next_due_ms is not None else State.FAILED
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
            owner=self.lease.holder,
            epoch=timer.epoch,
            state=state,
            at_ms=attempt.started_at_ms,
            status=attempt.status,
            error=attempt.error,
            next_due_at_ms=next_due_ms,
            record=record,
        )

    def _release(self, timer: Timer) -> None:
        """Hand a claim whose delivery was cut short back to pending, to fire again now."""
        assert timer.epoch is not None
        now_ms = self.clock.now_ms()
        self.outcomes.put(
            Outcome(
                timer_id=timer.id,
                owner=self.lease.holder,
                epoch=timer.epoch,
                state=State.PENDING,
                at_ms=now_ms,
                error="released at shutdown",
                next_due_at_ms=timer.due_at_ms,
            )
        )

    # waiting, failures, housekeeping, shutdown

    async def _safe_step(self) -> float:
        try:
            delay = await self.step()
        except StoreUnavailable as exc:
            delay = RETRY_DELAYS_S[min(self._store_failures, len(RETRY_DELAYS_S) - 1)]
            self._store_failures += 1
            self._forget_window()
            log.warning("store_unavailable", error=str(exc), retry_in_s=delay)
            return delay
        if self._store_failures:
            log.info("store_available_again")
            self._store_failures = 0
        return delay

    async def _sleep(self, delay_s: float) -> None:
        if delay_s <= 0:
            await asyncio.sleep(0)  # let deliveries and the API run between back-to-back claims
            return
        self._wake.clear()
        self.lease.changed.clear()
        wake = asyncio.create_task(self._wake.wait())
        changed = asyncio.create_task(self.lease.changed.wait())
        await asyncio.wait((wake, changed), timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        wake.cancel()
        changed.cancel()

    def _housekeeping(self) -> AsyncIOScheduler:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        scheduler = AsyncIOScheduler()
        # No misfire grace: a lease renewal that runs late must still run, never be skipped.
        every = {
            "trigger": "interval",
            "max_instances": 1,
            "coalesce": True,
            "misfire_grace_time": None,
        }
        tick_s = min(self.settings.lease_renew_s, self.settings.poll_interval_s)
        scheduler.add_job(self.lease.tick, seconds=tick_s, **every)
        watchdog_s = systemd.watchdog_interval_s()
        if watchdog_s is not None:  # pinged from this event loop: a stuck loop stops the pings
            scheduler.add_job(systemd.notify, args=["WATCHDOG=1"], seconds=watchdog_s, **every)
        scheduler.add_job(
            self.recover_expired,
            seconds=self.settings.lease_renew_s,
            next_run_time=datetime.now(),
            **every,
        )
        return scheduler

    async def recover_expired(self) -> None:
        """Return to pending the claims whose owner died (leader only)."""
        if not self.lease.is_leader():
            return
        try:
            n = await asyncio.to_thread(
                self.store.recover_expired, self.clock.now_ms(), self.settings.batch_size
            )
        except StoreUnavailable as exc:
            log.warning("recovery_store_unavailable", error=str(exc))
            return
        if n:
            log.warning("claims_recovered", count=n)
            self._next_poll_s = 0.0
            self._wake.set()

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("draining", inflight=len(self._inflight), grace_s=self.settings.drain_grace_s)
        _, late = await asyncio.wait(self._inflight, timeout=self.settings.drain_grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
            log.warning("drain_cut_short", released=len(late))

    async def _flush_outcomes(self, writer: asyncio.Task[None]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outcomes.drained(), self.settings.drain_grace_s)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
