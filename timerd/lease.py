"""Sharing the partitions of the timer space between live daemons, through lease documents.

Every daemon keeps a lease named `member:<holder>` alive while it runs, so each knows who else
is live. Each partition goes to the live member that rendezvous hashing picks for it, capped so
the shares differ by one at most; every daemon computes the same owners, and a join or a leave
moves few partitions. At each
tick a daemon renews what it holds, hands over at once the partitions another member should
have, and takes those that should be its own once they are free (released, or expired because
their holder died). One daemon alone holds them all.

A holder measures each lease on the monotonic clock from the moment it *sent* the write, and
stops claiming in a partition a quarter TTL before its lease can have expired for anyone else,
so a slow renewal or a clock that jumps never leaves two daemons firing one partition.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from timerd.clock import StoreClock
from timerd.errors import StoreUnavailable
from timerd.models import MEMBER_PREFIX, Lease, member_lease, partition_lease
from timerd.offload import Offload
from timerd.store import Store

log = structlog.get_logger("timerd.lease")

SAFE_FRACTION = 0.75  # of the TTL during which a lease we wrote is surely still ours


def daemon_identity() -> str:
    """A holder name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owners(partitions: int, members: Iterable[str]) -> list[str]:
    """The member that should hold each partition: rendezvous hashing (each partition ranks
    the members by a hash of the pair), each member capped at its fair share, so the shares
    differ by one at most, every daemon computes the same owners from the same members,
    and a join or a leave moves few partitions."""
    ranked = sorted(set(members))
    floor, extra = divmod(partitions, len(ranked))  # `extra` members hold one more than `floor`
    load = dict.fromkeys(ranked, 0)
    chosen = []
    for partition in range(partitions):
        order = sorted(ranked, key=lambda m: (_score(partition, m), m), reverse=True)
        owner = next(m for m in order if load[m] < floor or (load[m] == floor and extra))
        if load[owner] == floor:
            extra -= 1
        load[owner] += 1
        chosen.append(owner)
    return chosen


def _score(partition: int, member: str) -> bytes:
    # A real hash: CRC32's scores for names that differ in one byte move together.
    return hashlib.blake2b(f"{partition}/{member}".encode(), digest_size=8).digest()


def live_daemons(leases: Iterable[Lease], now_ms: int) -> dict[str, list[int]]:
    """Each live daemon (by its membership lease) and the partitions it holds live, in order."""
    live = [lease for lease in leases if lease.expires_at_ms >= now_ms]
    members = sorted(m.name.removeprefix(MEMBER_PREFIX) for m in live if _is_member(m))
    return {
        member: sorted(
            int(lease.name[1:])
            for lease in live
            if lease.holder == member and not _is_member(lease)
        )
        for member in members
    }


def _is_member(lease: Lease) -> bool:
    return lease.name.startswith(MEMBER_PREFIX)


@dataclass(frozen=True, slots=True)
class Held:
    """A partition lease this daemon holds: its epoch and how long it is surely ours."""

    epoch: int
    valid_until_s: float


class PartitionKeeper:
    """Holds (or waits for) this daemon's share of the partitions."""

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
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.partitions = store.partitions()
        self._offload = offload
        self._held: dict[int, Held] = {}
        self._member_epoch = 0
        self._renewed_at_s = -float("inf")
        self.changed = asyncio.Event()  # set when partitions are gained or lost

    # what the hot path asks

    def holds(self, partition: int) -> bool:
        """Whether this daemon can prove, on its monotonic clock, that `partition` is its own."""
        held = self._held.get(partition)
        return held is not None and self.clock.monotonic_s() < held.valid_until_s

    def held(self) -> list[int]:
        """The partitions this daemon can prove are its own, in order."""
        now_s = self.clock.monotonic_s()
        return sorted(p for p, held in self._held.items() if now_s < held.valid_until_s)

    def is_leader(self) -> bool:
        """Whether this daemon holds any partition at all."""
        return bool(self.held())

    # keeping the leases

    async def tick(self) -> None:
        """Renew what is held when due, then hand over and take partitions until this daemon
        holds its share. A host whose clock the store has not vouched for holds nothing."""
        if not self.clock.trusted:
            await self._refuse()
            return
        try:
            await self._renew()
            leases = await self._offload(self.store.leases)
            await self._rebalance(leases)
        except StoreUnavailable as exc:
            log.warning("lease_store_unavailable", error=str(exc), held=len(self.held()))
            self._drop_expired()

    async def _renew(self) -> None:
        sent_at_s = self.clock.monotonic_s()
        if sent_at_s - self._renewed_at_s < self.renew_s:
            return
        ttl_ms, now_ms = int(self.ttl_s * 1000), self.clock.now_ms()
        name = member_lease(self.holder)
        member = await self._offload(
            lambda: self.store.acquire_lease(name, self.holder, ttl_ms, now_ms)
        )
        self._member_epoch = 0 if member is None else member.epoch
        names = [partition_lease(p) for p in self._held]
        renewed = await self._offload(
            lambda: self.store.renew_leases(self.holder, names, ttl_ms, now_ms)
        )
        self._renewed_at_s = sent_at_s
        valid_until_s = sent_at_s + self.ttl_s * SAFE_FRACTION
        lost = [p for p in self._held if partition_lease(p) not in renewed]
        for partition, held in list(self._held.items()):
            self._held[partition] = Held(held.epoch, valid_until_s)
        self._lose(lost)

    async def _rebalance(self, leases: list[Lease]) -> None:
        now_ms = self.clock.now_ms()
        live = {lease.name: lease for lease in leases if lease.expires_at_ms >= now_ms}
        members = {n.removeprefix(MEMBER_PREFIX) for n in live if n.startswith(MEMBER_PREFIX)}
        members.add(self.holder)
        chosen = owners(self.partitions, members)
        mine = {p for p, owner in enumerate(chosen) if owner == self.holder}
        strays = self._strays(live.values(), keep=mine)  # before the hand-overs add to them
        # One store call per partition: renew between them when due, so that taking many
        # partitions from a slow store never lets the ones already held expire.
        for partition in sorted(set(self._held) - mine):
            await self._renew()
            await self._hand_over(partition)
        for stray in strays:
            await self._release(stray.name, stray.epoch)
        for partition in sorted(mine - set(self._held)):
            lease = live.get(partition_lease(partition))
            if lease is None or lease.holder == self.holder:
                await self._renew()
                await self._take(partition)

    async def _take(self, partition: int) -> None:
        name, ttl_ms = partition_lease(partition), int(self.ttl_s * 1000)
        sent_at_s, now_ms = self.clock.monotonic_s(), self.clock.now_ms()
        lease = await self._offload(
            lambda: self.store.acquire_lease(name, self.holder, ttl_ms, now_ms)
        )
        if lease is None:
            return  # another daemon took it first; the next tick sees who
        self._held[partition] = Held(lease.epoch, sent_at_s + self.ttl_s * SAFE_FRACTION)
        log.info("partition_acquired", holder=self.holder, partition=partition, epoch=lease.epoch)
        self.changed.set()

    async def _hand_over(self, partition: int) -> None:
        held = self._held.pop(partition, None)
        if held is None:  # lost at the renewal just before
            return
        self.changed.set()
        await self._release(partition_lease(partition), held.epoch)
        log.info("partition_handed_over", holder=self.holder, partition=partition)

    def _strays(self, leases: Iterable[Lease], keep: set[int]) -> list[Lease]:
        """Live partition leases the store says are ours but this daemon does not hold: a release
        that failed, or a take that the store applied but whose answer was lost. Left alone,
        they would keep their partitions from the daemons that should have them until the
        TTL runs out."""
        kept = {partition_lease(p) for p in self._held.keys() | keep}
        return [
            lease
            for lease in leases
            if lease.holder == self.holder and not _is_member(lease) and lease.name not in kept
        ]

    async def _release(self, name: str, epoch: int) -> None:
        await self._offload(functools.partial(self.store.release_lease, name, self.holder, epoch))

    def _lose(self, partitions: list[int]) -> None:
        for partition in partitions:
            del self._held[partition]
            log.warning("partition_lost", holder=self.holder, partition=partition)
        if partitions:
            self.changed.set()

    def _drop_expired(self) -> None:
        now_s = self.clock.monotonic_s()
        self._lose([p for p, held in self._held.items() if now_s >= held.valid_until_s])

    async def _refuse(self) -> None:
        if self.clock.synced:
            log.error(
                "clock_offset_refuses_leadership",
                holder=self.holder,
                offset_ms=self.clock.offset_ms,
                max_offset_ms=self.clock.max_offset_ms,
            )
        if self._held or self._member_epoch:
            await self.release()

    async def release(self) -> None:
        """Give every lease up at once (on a clean stop, or a clock out of bounds) so the other
        daemons take the partitions over without waiting for them to expire."""
        held, self._held = self._held, {}
        member_epoch, self._member_epoch = self._member_epoch, 0
        if held:
            self.changed.set()
        releases = [(partition_lease(p), h.epoch) for p, h in sorted(held.items())]
        if member_epoch:
            releases.append((member_lease(self.holder), member_epoch))
        try:
            for name, epoch in releases:
                await self._release(name, epoch)
            for lease in await self._offload(self.store.leases):  # and any the store says are ours
                if lease.holder == self.holder and lease.expires_at_ms > 0:
                    await self._release(lease.name, lease.epoch)
        except StoreUnavailable as exc:
            log.warning("lease_release_failed", error=str(exc))
            return
        if held:
            log.info("leader_released", holder=self.holder, partitions=len(held))
