"""A daemon's periodic care of its partitions: settle the claims of dead or stalled owners,
and delete finished timers once `TIMERD_RETENTION` has passed."""

from __future__ import annotations

import functools
from collections.abc import Callable

import structlog

from timerd.clock import Clock
from timerd.durations import parse_retention_s
from timerd.lease import PartitionKeeper
from timerd.models import MEMBER_PREFIX, partition_scope
from timerd.offload import Offload
from timerd.settings import Settings
from timerd.store import Store

log = structlog.get_logger("timerd.daemon")

PURGE_BATCH = 500  # deleted per statement, so API writes interleave with a long purge
DAY_MS = 86_400_000


class Housekeeper:
    """The recovery sweep and the retention purge of one daemon."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock,
        *,
        lease: PartitionKeeper,
        offload: Offload,
        max_attempts: int,
        on_recovered: Callable[[], None],
    ) -> None:
        """`max_attempts` is the retry schedule's budget; `on_recovered` hears when the sweep
        returned timers to pending (the due index has news)."""
        self._settings = settings
        self._store = store
        self._clock = clock
        self._lease = lease
        self._offload = offload
        self._max_attempts = max_attempts
        self._on_recovered = on_recovered
        retention_s = parse_retention_s(settings.retention)
        self._retention_ms = None if retention_s is None else int(retention_s * 1000)

    async def recover_expired(self) -> None:
        """Settle the claims whose owner died or stalled, in the partitions held here: each
        counts as a failed attempt, so the attempt budget holds across crashes."""
        held = self._lease.held()
        if not held:
            return
        call = functools.partial(
            self._store.recover_expired,
            self._clock.now_ms(),
            self._settings.batch_size,
            self._max_attempts,
            partition_scope(held, self._lease.partitions),
        )
        n = await self._offload(call)
        if n:
            log.warning("claims_recovered", count=n)
            self._on_recovered()

    async def purge_finished(self) -> None:
        """Delete the timers that finished more than `TIMERD_RETENTION` ago, a batch at a time,
        and the membership leases of daemons gone for a day (by the holder of partition 0
        alone, so daemons never contend for the same rows)."""
        if not self._lease.holds(0):
            return
        now_ms = self._clock.now_ms()
        gone = functools.partial(self._store.delete_leases, MEMBER_PREFIX, now_ms - DAY_MS)
        await self._offload(gone)
        if self._retention_ms is None:
            return
        purge = functools.partial(
            self._store.purge_finished, now_ms - self._retention_ms, PURGE_BATCH
        )
        deleted = PURGE_BATCH
        while deleted == PURGE_BATCH and self._lease.holds(0):
            deleted = await self._offload(purge)
            if deleted:
                log.info("finished_timers_deleted", count=deleted)
