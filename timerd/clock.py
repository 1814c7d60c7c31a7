"""Time sources: wall-clock milliseconds for due times, a monotonic clock for intervals."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol


class Clock(Protocol):
    """What the daemon reads time from; tests pass their own."""

    def now_ms(self) -> int:
        """UTC epoch milliseconds (wall clock): what due times are compared with."""
        ...

    def monotonic_s(self) -> float:
        """Seconds on a clock that never jumps: what leases and intervals are measured with."""
        ...


class SystemClock:
    """The real clocks."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_s(self) -> float:
        return time.monotonic()


MAX_SAMPLE_RTT_MS = 1000  # a reading of the store's clock that took longer says too little


class StoreClock:
    """This host's clock, corrected to the store's: the one clock every host judges by.

    `offset_ms` is measured by `observe` from a reading of the store's clock and the local
    times just before and after it (the store read its clock in between: the error is at most
    half the round trip). A store that shares this host's clock (SQLite) gives no reading and
    the offset stays 0.
    """

    def __init__(self, local: Clock, max_offset_ms: int) -> None:
        self.local = local
        self.max_offset_ms = max_offset_ms
        self.offset_ms = 0
        self.synced = False  # no reading taken yet: not fit to lead

    def now_ms(self) -> int:
        return self.local.now_ms() + self.offset_ms

    def monotonic_s(self) -> float:
        return self.local.monotonic_s()

    def observe(self, sent_ms: int, store_ms: int | None, received_ms: int) -> bool:
        """Take a reading of the store's clock made between local `sent_ms` and `received_ms`;
        return whether it was used (a slow round trip is ignored)."""
        if store_ms is not None and received_ms - sent_ms > MAX_SAMPLE_RTT_MS:
            return False
        self.offset_ms = 0 if store_ms is None else store_ms - (sent_ms + received_ms) // 2
        self.synced = True
        return True

    @property
    def trusted(self) -> bool:
        """Whether this host may lead: its clock was compared with the store's and is within
        `max_offset_ms` of it."""
        return self.synced and abs(self.offset_ms) <= self.max_offset_ms


async def read_store_clock(
    clock: StoreClock, read_store_ms: Callable[[], Awaitable[int | None]]
) -> bool:
    """Read the store's clock once (`read_store_ms`) and correct `clock` by it; return whether
    the reading was used."""
    sent_ms = clock.local.now_ms()
    store_ms = await read_store_ms()
    return clock.observe(sent_ms, store_ms, clock.local.now_ms())
