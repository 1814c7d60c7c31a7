"""Leader election through the store's lease document.

The keeper tries to take the lease at every tick while it stands by, and renews it every
`lease_renew_s` while it leads. It measures its own lease on the monotonic clock from the moment
it *sent* the write, and stops claiming a quarter TTL before the lease can have expired for
anyone else, so a slow renewal or a clock that jumps never leaves two leaders firing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import structlog

from timerd.clock import StoreClock
from timerd.errors import StoreUnavailable
from timerd.models import Lease
from timerd.offload import Offload
from timerd.store import Store

log = structlog.get_logger("timerd.lease")

SAFE_FRACTION = 0.75  # of the TTL during which a lease we wrote is surely still ours


def daemon_identity() -> str:
    """A holder name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseKeeper:
    """Holds (or waits for) the leader lease for one daemon."""

    def __init__(
        self,
        store: Store,
        clock: StoreClock,
        holder: str,
        *,
        ttl_s: float,
        renew_s: float,
        offload: Offload,
    ) -> None:
        self.store = store
        self.clock = clock
        self._offload = offload
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.epoch = 0
        self._valid_until_s = 0.0
        self._renewed_at_s = -float("inf")
        self.changed = asyncio.Event()  # set when leadership is gained or lost

    def is_leader(self) -> bool:
        """Whether this daemon can prove, on its monotonic clock, that the lease is its own."""
        return self.clock.monotonic_s() < self._valid_until_s

    async def tick(self) -> None:
        """Renew when leading and a renewal is due; otherwise try to take the lease. A host
        whose clock the store has not vouched for gives the lease up instead."""
        sent_at_s = self.clock.monotonic_s()
        if not self.clock.trusted:
            await self._refuse()
            return
        if self.is_leader() and sent_at_s - self._renewed_at_s < self.renew_s:
            return
        was_leader = self.is_leader()
        holder, ttl_ms, now_ms = self.holder, int(self.ttl_s * 1000), self.clock.now_ms()
        try:
            lease = await self._offload(lambda: self.store.acquire_lease(holder, ttl_ms, now_ms))
        except StoreUnavailable as exc:
            log.warning("lease_store_unavailable", error=str(exc), leader=was_leader)
            lease = None
        self._record(lease, sent_at_s, was_leader)

    async def _refuse(self) -> None:
        if self.clock.synced:
            log.error(
                "clock_offset_refuses_leadership",
                holder=self.holder,
                offset_ms=self.clock.offset_ms,
                max_offset_ms=self.clock.max_offset_ms,
            )
        if self.is_leader():
            await self.release()
            self.changed.set()

    def _record(self, lease: Lease | None, sent_at_s: float, was_leader: bool) -> None:
        if lease is not None:
            self._valid_until_s = sent_at_s + self.ttl_s * SAFE_FRACTION
            self._renewed_at_s = sent_at_s
            if not was_leader or lease.epoch != self.epoch:
                self.epoch = lease.epoch
                log.info("leader_acquired", holder=self.holder, epoch=lease.epoch)
                self.changed.set()
        elif was_leader and not self.is_leader():
            log.warning("leader_lost", holder=self.holder, epoch=self.epoch)
            self.changed.set()

    async def release(self) -> None:
        """Give the lease up at once (on a clean stop) so a standby takes over without waiting."""
        if self.epoch == 0:
            return
        self._valid_until_s = 0.0
        holder, epoch = self.holder, self.epoch
        try:
            released = await self._offload(lambda: self.store.release_lease(holder, epoch))
        except StoreUnavailable as exc:
            log.warning("lease_release_failed", error=str(exc))
            return
        if released:
            log.info("leader_released", holder=self.holder, epoch=self.epoch)
