"""The firing daemon: claims the due timers of the partitions it holds at their instant and
fires them.

It reads those partitions' pending timers due within `lookahead_s` (never claiming them yet) into a
small heap, sleeps until the earliest is due, a poll is due, or news arrives, then claims what
is due in one conditional write and starts exactly those deliveries. Memory holds at most one
batch of due times, whatever the backlog.

Every task (the fire loop, deliveries, the outcome writer, lease renewal, the clock reading,
the recovery sweep, the systemd watchdog) runs in one task group. Store errors are retried with
backoff and never end a task; any other exception ends them all and `run` raises it, so the
process exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from timerd import metrics, systemd
from timerd.backoff import Backoff
from timerd.callbacks import CallbackFirer, DeliverCallback
from timerd.clock import Clock, StoreClock, SystemClock, read_store_clock
from timerd.delivery import Attempt
from timerd.durations import parse_retention_s
from timerd.errors import DaemonCrashed, StoreUnavailable
from timerd.hosts import Entry, HostSlots, host_of
from timerd.lease import PartitionKeeper, daemon_identity
from timerd.models import (
    MEMBER_PREFIX,
    Claim,
    Outcome,
    State,
    Timer,
    new_claim_token,
    partition_of,
)
from timerd.offload import Offload, pool_offload, thread_pool
from timerd.outcomes import OutcomeWriter, judge
from timerd.retry import RetryPolicy
from timerd.settings import Settings
from timerd.store import Store

log = structlog.get_logger("timerd.daemon")

Deliver = Callable[[Timer], Awaitable[Attempt]]

MAX_PAGES_PER_POLL = 4  # of the due index read past parked hosts' timers in one poll
CLAIM_COALESCE_S = 0.002  # when few slots are free, wait this long for more before claiming
CLOCK_READ_S = 10.0  # how often the store's clock is read
PURGE_EVERY_S = 10.0  # finished timers go within this (and a few batches) of their moment
PURGE_BATCH = 500  # deleted per statement, so API writes interleave with a long purge
DAY_MS = 86_400_000
STORE_THREADS = 4  # claims, polls, outcomes and the sweep never wait behind one another


@dataclass(frozen=True, slots=True)
class Counters:
    """What a daemon holds at a moment; all zero when it is idle."""

    inflight: int  # deliveries under way
    host_slots: int  # per-host slots taken, or promised to released entries
    parked: int  # due entries waiting for a slot at their host
    outcomes_queued: int  # outcomes not written yet
    unsettled_claims: int  # claims that failed or came back late, not released yet


class Daemon:
    """Fires the timers of the partitions of one store that it holds."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        deliver: Deliver,
        *,
        clock: Clock | None = None,
        holder: str | None = None,
        offload: Offload | None = None,
        deliver_callback: DeliverCallback | None = None,
    ) -> None:
        """`clock` is this host's (corrected to the store's here) or a `StoreClock` already
        shared with the deliverer. `offload` runs every store call; by default, thread pools
        of the daemon's own (one for the lease alone). Tests and the simulator pass one that
        runs calls inline. `deliver_callback` sends failure callbacks (`timerd.callbacks`);
        without it this daemon sends none."""
        self.settings = settings
        self.store = store
        if not isinstance(clock, StoreClock):  # a bare host clock: correct it here
            clock = StoreClock(clock or SystemClock(), int(settings.max_clock_offset_s * 1000))
        self.clock = clock
        self._pools: list[ThreadPoolExecutor] = []
        self._offload = offload or self._pool("timerd-store", STORE_THREADS)
        self.lease = PartitionKeeper(
            store,
            self.clock,
            holder or daemon_identity(),
            ttl_s=settings.lease_ttl_s,
            renew_s=settings.lease_renew_s,
            offload=offload or self._pool("timerd-lease", 1),
        )
        self.outcomes = OutcomeWriter(store, self._offload)
        self.callbacks = (
            None
            if deliver_callback is None
            else CallbackFirer(
                settings,
                store,
                deliver_callback,
                clock=self.clock,
                # a thread of their own: callbacks never hold up claims, polls or outcomes
                offload=offload or self._pool("timerd-callbacks", 1),
                holder=self.lease.holder,
                held=self.lease.held,
                partitions=self.lease.partitions,
                spawn=self._spawn,
            )
        )
        self.retry = RetryPolicy.from_setting(settings.retry_schedule)
        retention_s = parse_retention_s(settings.retention)
        self._retention_ms = None if retention_s is None else int(retention_s * 1000)
        self._deliver = deliver
        self._window: list[Entry] = []  # heap of (due_at_ms, id, host): the lookahead window
        self._window_full = False  # the last poll hit batch_size: more may be due behind it
        self._heard: list[Entry] = []  # inserts announced while a poll was under way
        self._hosts = HostSlots(settings.per_host_concurrency, settings.batch_size)
        self._polling = False
        self._next_poll_s = 0.0
        self._inflight: set[asyncio.Task[None]] = set()
        self._unsettled: list[str] = []  # tokens of claims to give back before claiming more
        self._partitions: list[int] = []  # those held at the last step
        self._wake = asyncio.Event()
        self._slots_wanted = 0
        self._stopping = False
        self._store_backoff = Backoff()
        self._tasks: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set once running
        metrics.IN_FLIGHT.set_function(lambda: len(self._inflight))
        metrics.LEADER.set_function(lambda: int(self.lease.is_leader()))
        metrics.PARTITIONS_HELD.set_function(lambda: len(self.lease.held()))

    def _pool(self, name: str, threads: int) -> Offload:
        pool = thread_pool(name, threads)
        self._pools.append(pool)
        return pool_offload(pool)

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

    def counters(self) -> Counters:
        """What the daemon holds now (see `Counters`)."""
        return Counters(
            inflight=len(self._inflight),
            host_slots=self._hosts.held,
            parked=self._hosts.parked,
            outcomes_queued=self.outcomes.queued,
            unsettled_claims=len(self._unsettled),
        )

    async def run(self) -> None:
        """Run until `stop()`: keep the lease, fire due timers, then drain and release.
        An unexpected error in any task ends them all: it is logged with its traceback and
        `DaemonCrashed` raised from it."""
        self._loop = asyncio.get_running_loop()
        log.info("daemon_started", holder=self.lease.holder)
        try:
            async with asyncio.TaskGroup() as tasks:
                self.attach(tasks)
                await self._lead(tasks)
        except Exception as exc:
            log.exception("daemon_crashed", holder=self.lease.holder)
            raise DaemonCrashed(f"daemon {self.lease.holder} crashed: {exc!r}") from exc
        finally:
            self._tasks = None
            await self.lease.release()
            for pool in self._pools:
                pool.shutdown(wait=False)
        log.info("daemon_stopped", holder=self.lease.holder)

    def attach(self, tasks: asyncio.TaskGroup) -> None:
        """Start deliveries in `tasks`: `run` does this; tests that drive `step` by hand
        call it with a group of their own."""
        self._loop = asyncio.get_running_loop()
        self._tasks = tasks

    async def _lead(self, tasks: asyncio.TaskGroup) -> None:
        try:
            await self.read_store_clock()
        except StoreUnavailable as exc:  # the clock task tries again; until then, no leading
            log.warning("store_unavailable", task="clock", error=str(exc))
        await self.lease.tick()
        helpers = [
            tasks.create_task(self.outcomes.run(), name="timerd-outcomes"),
            self._every(tasks, "lease", self._lease_tick_s(), self.lease.tick),
            self._every(tasks, "clock", CLOCK_READ_S, self.read_store_clock),
            self._every(tasks, "sweep", self.settings.lease_renew_s, self.recover_expired),
        ]
        helpers.append(self._every(tasks, "purge", PURGE_EVERY_S, self.purge_finished))
        if self.callbacks is not None:
            poll_s = self.settings.poll_interval_s
            helpers.append(self._every(tasks, "callbacks", poll_s, self.callbacks.tick))
            sweep_s = self.settings.lease_renew_s
            helpers.append(
                self._every(tasks, "callback-sweep", sweep_s, self.callbacks.recover_expired)
            )
        watchdog_s = systemd.watchdog_interval_s()
        if watchdog_s is not None:  # pinged from this event loop: a stuck loop stops the pings
            helpers.append(self._every(tasks, "watchdog", watchdog_s, systemd.watchdog))
        systemd.notify("READY=1")
        while not self._stopping:
            await self._sleep(await self._safe_step())
        await self._drain()
        await self._flush_outcomes()
        for helper in helpers:
            helper.cancel()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Start a failure callback's delivery in the daemon's task group."""
        assert self._tasks is not None, "callbacks start only while the daemon runs"
        self._tasks.create_task(work)

    def _lease_tick_s(self) -> float:
        return min(self.settings.lease_renew_s, self.settings.poll_interval_s)

    def _every(
        self,
        tasks: asyncio.TaskGroup,
        name: str,
        interval_s: float,
        work: Callable[[], Coroutine[Any, Any, None]],
    ) -> asyncio.Task[None]:
        """Run `work` every `interval_s` in the group, retrying store errors with backoff."""

        async def forever() -> None:
            backoff = Backoff()
            while True:
                try:
                    await work()
                    backoff.reset()
                    delay_s = interval_s
                except StoreUnavailable as exc:
                    delay_s = min(interval_s, backoff.next_s())
                    log.warning("store_unavailable", task=name, error=str(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)

        return tasks.create_task(forever(), name=f"timerd-{name}")

    async def read_store_clock(self) -> None:
        """Measure this host's clock against the store's (see `StoreClock`); until this has
        succeeded once the daemon does not lead."""
        if not await read_store_clock(self.clock, lambda: self._offload(self.store.server_time_ms)):
            log.info("store_clock_reading_ignored", reason="slow round trip")

    # the hot path

    async def step(self) -> float:
        """Do what is due now; return how many seconds may pass before the next step."""
        await self._settle_claims()
        held = self.lease.held()
        if held != self._partitions:  # gained some (read them now) or lost some (forget them)
            self._partitions = held
            self._forget_window()
        if not held:
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

    def _consider(self, timer: Timer) -> None:
        if timer.due_at_ms < self.clock.now_ms() + self.settings.lookahead_s * 1000:
            entry = (timer.due_at_ms, timer.id, host_of(timer.url))
            heapq.heappush(self._window, entry)
            if self._polling:
                self._heard.append(entry)
            self._wake.set()

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
        partitions = None if len(self._partitions) == self.lease.partitions else self._partitions
        for _ in range(MAX_PAGES_PER_POLL):
            page = await self._offload(
                functools.partial(self.store.pending_due, horizon_ms, batch, after, partitions)
            )
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
            if not self.lease.holds(partition_of(entry[1], self.lease.partitions)):
                continue  # handed over or lost since it was read: its new holder fires it
            if self._hosts.take(entry):
                taken.append(entry)
        return taken

    async def _claim_and_fire(self, entries: list[Entry], now_ms: int) -> None:
        """Claim the taken entries in one write and start their deliveries. Every slot taken
        for an entry goes back unless a delivery now holds it, whatever the claim came to."""
        unique = {entry[1]: entry for entry in entries}  # a poll and an announcement may agree
        started: set[str] = set()
        try:
            if self.lease.is_leader() and unique:
                started = await self._claim(list(unique), now_ms, unique)
        finally:
            for entry in entries:
                if entry[1] not in started or unique[entry[1]] is not entry:
                    self._give_back(entry[2])  # not claimed (cancelled, moved, elsewhere), or twice

    async def _claim(self, ids: list[str], now_ms: int, unique: dict[str, Entry]) -> set[str]:
        """Claim `ids`; fire what came back in time, release the rest; return the ids fired."""
        claim = Claim(
            owner=self.lease.holder,
            now_ms=now_ms,
            until_ms=now_ms + self.settings.claim_ttl_ms,
            token=new_claim_token(),
        )
        self._unsettled.append(claim.token)  # until we know what the write did
        claimed = await self._offload(functools.partial(self.store.claim_due, ids, claim))
        if len(claimed) < len(ids):
            log.debug("claims_lost", wanted=len(ids), claimed=len(claimed))
        if claimed and not self._in_time(claim.until_ms):
            log.warning("claim_too_late", count=len(claimed), token=claim.token)
            return set()  # stays unsettled: released before the next claim
        self._unsettled.remove(claim.token)
        for timer in claimed:
            self._start(timer, unique[timer.id][2])
        return {timer.id for timer in claimed}

    def _in_time(self, claimed_until_ms: int) -> bool:
        """Whether a delivery started now ends well inside its claim: a claim that comes back
        later (a stall, a queued thread) is released, not fired."""
        return self.settings.covers_delivery(claimed_until_ms, self.clock.now_ms())

    async def _settle_claims(self) -> None:
        """Give back the claims that failed (they may have been applied in part) or came back
        too late; a store error leaves the rest for the next step."""
        while self._unsettled:
            token = self._unsettled[0]
            released = await self._offload(functools.partial(self.store.release_claim, token))
            self._unsettled.pop(0)
            if released:
                log.info("claim_released", token=token, count=released)
                self._next_poll_s = 0.0

    def _start(self, timer: Timer, host: str) -> None:
        assert self._tasks is not None, "deliveries start only while the daemon runs"
        task = self._tasks.create_task(self._fire(timer))
        self._inflight.add(task)
        # The slot is the entry's: a PATCH may have moved the url since it was read.
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
        """Deliver a claimed timer once and queue its outcome. Whatever the delivery raises
        becomes a failed attempt, so no claim is ever left to expire unreported."""
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
            attempt = Attempt(self.clock.now_ms(), 0.0, error=type(exc).__name__)
        outcome = judge(timer, attempt, self.retry, self.clock.now_ms())
        self.outcomes.put(outcome)
        _observe(timer, attempt, outcome)
        log.info(
            "delivery",
            timer_id=timer.id,
            attempt=timer.attempts,
            outcome=outcome.state.value,
            status=attempt.status,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            late_ms=attempt.started_at_ms - timer.due_at_ms,
            next_due_at_ms=outcome.next_due_at_ms,
        )

    def _release(self, timer: Timer, why: str) -> None:
        """Hand a claim whose delivery was cut short (or never started) back to pending, to
        fire again at once."""
        assert timer.claim_token is not None
        self.outcomes.put(
            Outcome(
                timer_id=timer.id,
                claim_token=timer.claim_token,
                state=State.PENDING,
                at_ms=self.clock.now_ms(),
                error=why,
                next_due_at_ms=timer.due_at_ms,
            )
        )

    # waiting, failures, housekeeping, shutdown

    async def _safe_step(self) -> float:
        try:
            delay = await self.step()
        except StoreUnavailable as exc:
            delay = self._store_backoff.next_s()
            self._forget_window()
            log.warning("store_unavailable", task="fire", error=str(exc), retry_in_s=delay)
            return delay
        if self._store_backoff.failures:
            log.info("store_available_again")
            self._store_backoff.reset()
        return delay

    async def _sleep(self, delay_s: float) -> None:
        if delay_s <= 0:
            await asyncio.sleep(0)  # let deliveries and the API run between back-to-back claims
            return
        self._wake.clear()
        self.lease.changed.clear()
        wake = asyncio.ensure_future(self._wake.wait())
        changed = asyncio.ensure_future(self.lease.changed.wait())
        await asyncio.wait((wake, changed), timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
        wake.cancel()
        changed.cancel()

    async def recover_expired(self) -> None:
        """Settle the claims whose owner died or stalled, in the partitions held here: each
        counts as a failed attempt, so the attempt budget holds across crashes."""
        held = self.lease.held()
        if not held:
            return
        call = functools.partial(
            self.store.recover_expired,
            self.clock.now_ms(),
            self.settings.batch_size,
            self.retry.max_attempts,
            None if len(held) == self.lease.partitions else held,
        )
        n = await self._offload(call)
        if n:
            log.warning("claims_recovered", count=n)
            self._next_poll_s = 0.0
            self._wake.set()

    async def purge_finished(self) -> None:
        """Delete the timers that finished more than `TIMERD_RETENTION` ago, a batch at a time,
        and the membership leases of daemons gone for a day (by the holder of partition 0
        alone, so daemons never contend for the same rows)."""
        if not self.lease.holds(0):
            return
        now_ms = self.clock.now_ms()
        gone = functools.partial(self.store.delete_leases, MEMBER_PREFIX, now_ms - DAY_MS)
        await self._offload(gone)
        if self._retention_ms is None:
            return
        purge = functools.partial(
            self.store.purge_finished, now_ms - self._retention_ms, PURGE_BATCH
        )
        deleted = PURGE_BATCH
        while deleted == PURGE_BATCH and self.lease.holds(0):
            deleted = await self._offload(purge)
            if deleted:
                log.info("finished_timers_deleted", count=deleted)

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

    async def _flush_outcomes(self) -> None:
        try:
            await asyncio.wait_for(self.outcomes.drained(), self.settings.drain_grace_s)
        except TimeoutError:
            log.warning("outcomes_not_written", queued=self.outcomes.queued)


def _observe(timer: Timer, attempt: Attempt, outcome: Outcome) -> None:
    metrics.DELIVERIES_BY_STATE[outcome.state].inc()
    metrics.DELIVERY_LATENCY.observe(attempt.latency_ms / 1000)
    metrics.LATENESS.observe(max(0, attempt.started_at_ms - timer.due_at_ms) / 1000)
