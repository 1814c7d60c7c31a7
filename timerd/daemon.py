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
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from timerd import metrics, systemd
from timerd.backoff import Backoff
from timerd.callbacks import CallbackFirer, DeliverCallback
from timerd.claims import Claimer
from timerd.clock import Clock, StoreClock, SystemClock, read_store_clock
from timerd.errors import DaemonCrashed, StoreUnavailable
from timerd.firing import Deliver, Deliveries
from timerd.hosts import Entry, HostSlots
from timerd.housekeeping import Housekeeper
from timerd.lease import PartitionKeeper, daemon_identity
from timerd.models import Due, Timer, partition_of, partition_scope
from timerd.offload import Offload, hybrid_offload, pool_offload, thread_pool
from timerd.outcomes import OutcomeWriter
from timerd.retry import RetryPolicy
from timerd.settings import Settings
from timerd.store import Store
from timerd.window import DueWindow

log = structlog.get_logger("timerd.daemon")

__all__ = ["Counters", "Daemon", "Deliver"]

CLAIM_COALESCE_S = 0.002  # when few slots are free, wait this long for more before claiming
CLOCK_READ_S = 10.0  # how often the store's clock is read
CHECKPOINT_S = 1.0  # how often the write-ahead log is copied into the store's file, at most
PURGE_EVERY_S = 10.0  # finished timers go within this (and a few batches) of their moment
STORE_THREADS = 4  # claims, polls, outcomes and the sweep never wait behind one another
SUMMARY_S = 60.0  # how often the `deliveries` summary is logged (see `timerd.firing`)


@dataclass(frozen=True, slots=True)
class Counters:
    """What a daemon holds at a moment; all zero when it is idle."""

    inflight: int  # deliveries under way
    host_slots: int  # per-host slots taken, or promised to released entries
    parked: int  # due entries waiting for a slot at their host
    outcomes_queued: int  # outcomes not written yet
    unsettled_claims: int  # claims that failed or came back late, not released yet


class Daemon:
    """Fires the timers of the partitions of one store that it holds: the supervisor of its
    parts (the due `window`, the `claimer`, the `deliveries`, the `outcomes` writer, the
    `lease` keeper, the `housekeeper`) and the loop that moves timers from one to the next."""

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
        of the daemon's own (one for the lease alone), and for claims and outcomes the event
        loop itself whenever the store can make them without waiting. Tests and the
        simulator pass one that runs calls inline. `deliver_callback` sends failure callbacks
        (`timerd.callbacks`); without it this daemon sends none."""
        self.settings = settings
        self.store = store
        if not isinstance(clock, StoreClock):  # a bare host clock: correct it here
            clock = StoreClock(clock or SystemClock(), int(settings.max_clock_offset_s * 1000))
        self.clock = clock
        self._pools: list[ThreadPoolExecutor] = []
        self._background = offload or self._pool("timerd-store", STORE_THREADS)
        nonblocking = None if offload else store.nonblocking()
        self._offload = (
            self._background
            if nonblocking is None
            else hybrid_offload(nonblocking, elsewhere=self._background)
        )
        self.lease = PartitionKeeper(
            store,
            self.clock,
            holder or daemon_identity(),
            ttl_s=settings.lease_ttl_s,
            renew_s=settings.lease_renew_s,
            offload=offload or self._pool("timerd-lease", 1),
        )
        self.retry = RetryPolicy.from_setting(settings.retry_schedule)
        self.outcomes = OutcomeWriter(store, self._offload)
        hosts = HostSlots(settings.per_host_concurrency, settings.batch_size)
        self.window = DueWindow(hosts, settings.batch_size, settings.poll_interval_s, self.clock)
        self.claimer = Claimer(settings, store, self.clock, self._offload, self.lease.holder)
        self.deliveries = Deliveries(
            deliver,
            self.outcomes,
            self.retry,
            now_ms=self.clock.now_ms,
            in_time=self.claimer.in_time,
            on_done=self._delivery_done,
        )
        self.housekeeper = Housekeeper(
            settings,
            store,
            self.clock,
            lease=self.lease,
            offload=self._background,
            max_attempts=self.retry.max_attempts,
            on_recovered=self._poll_now,
        )
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
        self._partitions: list[int] = []  # those held at the last step
        self._summarised_s = self.clock.monotonic_s()
        self._wake = asyncio.Event()
        self._slots_wanted = 0
        self._stopping = False
        self._store_backoff = Backoff()
        self._tasks: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set once running
        metrics.IN_FLIGHT.set_function(lambda: len(self.deliveries))
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
            inflight=len(self.deliveries),
            host_slots=self.window.hosts.held,
            parked=self.window.hosts.parked,
            outcomes_queued=self.outcomes.queued,
            unsettled_claims=self.claimer.unsettled,
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

    async def read_store_clock(self) -> None:
        """Measure this host's clock against the store's (see `StoreClock`); until this has
        succeeded once the daemon does not lead."""
        if not await read_store_clock(self.clock, lambda: self._offload(self.store.server_time_ms)):
            log.info("store_clock_reading_ignored", reason="slow round trip")

    async def recover_expired(self) -> None:
        """The recovery sweep, once (see `Housekeeper.recover_expired`)."""
        await self.housekeeper.recover_expired()

    def log_summary(self) -> None:
        """Log how the attempts that ended since the last summary came out (`deliveries`, at
        info), unless none did: the daemon does this every SUMMARY_S and when it stops."""
        now_s = self.clock.monotonic_s()
        over_s, self._summarised_s = now_s - self._summarised_s, now_s
        counts = self.deliveries.tally.take()
        if counts["delivered"] or counts["retrying"] or counts["failed"]:
            log.info("deliveries", **counts, over_s=round(over_s, 1))

    async def _summarise(self) -> None:
        self.log_summary()

    async def _checkpoint(self) -> None:
        await self._background(self.store.checkpoint)

    async def purge_finished(self) -> None:
        """The retention purge, once (see `Housekeeper.purge_finished`)."""
        await self.housekeeper.purge_finished()

    # supervision

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
            self._every(tasks, "purge", PURGE_EVERY_S, self.purge_finished),
            self._every(tasks, "summary", SUMMARY_S, self._summarise),
        ]
        if self._offload is not self._background:  # the loop's own calls never checkpoint
            helpers.append(self._every(tasks, "checkpoint", CHECKPOINT_S, self._checkpoint))
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
            await self._sleep(await self.step_or_back_off())
        await self.deliveries.drain(self.settings.drain_grace_s)
        await self._flush_outcomes()
        self.log_summary()
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

    # the hot path

    async def step(self) -> float:
        """Do what is due now; return how many seconds may pass before the next step."""
        if await self.claimer.settle():
            self.window.poll_soon()
        held = self.lease.held()
        if held != self._partitions:  # gained some (read them now) or lost some (forget them)
            self._partitions = held
            self.window.forget()
        if not held:
            return self.settings.poll_interval_s
        if self.window.poll_is_due():
            await self._poll()
        now_ms = self.clock.now_ms()
        earliest_ms = self.window.earliest_ms
        if earliest_ms is None or earliest_ms > now_ms:
            return self.window.idle_s(now_ms)
        free = self.settings.concurrency - len(self.deliveries)
        if free < min(self._claim_min(), len(self.window)) and len(self.deliveries):
            self._slots_wanted = self._claim_min()
            return CLAIM_COALESCE_S if free else self.settings.poll_interval_s
        await self._claim_and_fire(self.window.take_due(now_ms, free, self._holds), now_ms)
        return 0.0

    async def step_or_back_off(self) -> float:
        """`step`; when the store is unavailable, forget the window and return the backoff's
        delay instead."""
        try:
            delay = await self.step()
        except StoreUnavailable as exc:
            delay = self._store_backoff.next_s()
            self.window.forget()
            log.warning("store_unavailable", task="fire", error=str(exc), retry_in_s=delay)
            return delay
        if self._store_backoff.failures:
            log.info("store_available_again")
            self._store_backoff.reset()
        return delay

    def _claim_min(self) -> int:
        return max(1, min(self.settings.concurrency // 4, 64))

    def _holds(self, timer_id: str) -> bool:
        return self.lease.holds(partition_of(timer_id, self.lease.partitions))

    def _consider(self, timer: Timer) -> None:
        if timer.due_at_ms < self.clock.now_ms() + self.settings.lookahead_s * 1000:
            self.window.add(Entry.of(timer))
            self._wake.set()

    def _poll_now(self) -> None:
        self.window.poll_soon()
        self._wake.set()

    async def _poll(self) -> None:
        horizon_ms = self.clock.now_ms() + int(self.settings.lookahead_s * 1000)
        partitions = partition_scope(self._partitions, self.lease.partitions)

        async def read_page(
            before_ms: int, limit: int, after: tuple[int, str] | None
        ) -> Sequence[Due]:
            page = functools.partial(self.store.pending_due, before_ms, limit, after, partitions)
            return await self._background(page)  # a page is long to read on the loop

        await self.window.poll(read_page, horizon_ms)

    async def _claim_and_fire(self, entries: list[Entry], now_ms: int) -> None:
        """Claim the taken entries in one write and start their deliveries. Every slot taken
        for an entry goes back unless a delivery now holds it, whatever the claim came to."""
        unique = {entry.timer_id: entry for entry in entries}  # a poll and an announcement
        started: set[str] = set()  # may agree
        try:
            if self.lease.is_leader() and unique:
                claimed = await self.claimer.claim(list(unique), now_ms)
                assert self._tasks is not None, "deliveries start only while the daemon runs"
                for timer in claimed:
                    self.deliveries.start(self._tasks, timer, unique[timer.id].host)
                started = {timer.id for timer in claimed}
        finally:
            for entry in entries:
                if entry.timer_id not in started or unique[entry.timer_id] is not entry:
                    self._give_back(entry.host)  # not claimed (cancelled, moved, elsewhere)

    def _give_back(self, host: str) -> None:
        if self.window.give_back(host):
            self._wake.set()

    def _delivery_done(self, host: str) -> None:
        self._give_back(host)
        free = self.settings.concurrency - len(self.deliveries)
        if self._slots_wanted and free >= self._slots_wanted:
            self._slots_wanted = 0
            self._wake.set()

    # waiting and shutdown

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

    async def _flush_outcomes(self) -> None:
        try:
            await asyncio.wait_for(self.outcomes.drained(), self.settings.drain_grace_s)
        except TimeoutError:
            log.warning("outcomes_not_written", queued=self.outcomes.queued)
