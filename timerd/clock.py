"""Time sources: wall-clock milliseconds for due times, a monotonic clock for intervals."""

from __future__ import annotations

import collections
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
READINGS_KEPT = 8  # the most precise of these recent readings is the one used
CLOCK_JITTER_MS = 5  # readings further apart than their errors and this: a clock stepped


class StoreClock:
    """This host's clock, corrected to the store's: the one clock every host judges by.

    `observe` takes a reading of the store's clock and the local times just before and after
    it: the store read its clock somewhere in between, so the offset it gives is off by at most
    half the round trip (`error_ms`). Of the last few readings the one with the smallest error
    is used, and `now_ms` is the earliest the store's clock can read now (local time plus the
    offset, less its error): judged by it, nothing is ever early, a claim deadline or a lease
    expiry is never late, and the sweep never takes a claim back too soon. A store that shares
    this host's clock (SQLite) gives no reading: the offset and its error stay 0.
    """

    def __init__(self, local: Clock, max_offset_ms: int) -> None:
        self.local = local
        self.max_offset_ms = max_offset_ms
        self.offset_ms = 0
        self.error_ms = 0
        self.synced = False  # no reading taken yet: not fit to lead
        self._readings: collections.deque[tuple[int, int]] = collections.deque(maxlen=READINGS_KEPT)

    def now_ms(self) -> int:
        return self.local.now_ms() + self.offset_ms - self.error_ms

    def monotonic_s(self) -> float:
        return self.local.monotonic_s()

    def observe(self, sent_ms: int, store_ms: int | None, received_ms: int) -> bool:
        """Take a reading of the store's clock made between local `sent_ms` and `received_ms`;
        return whether it was used (a slow round trip is ignored)."""
        round_trip_ms = received_ms - sent_ms
        if store_ms is not None and round_trip_ms > MAX_SAMPLE_RTT_MS:
            return False
        if store_ms is None:
            self._readings.clear()
            self._readings.append((0, 0))
        else:
            reading = (store_ms - (sent_ms + received_ms) // 2, (round_trip_ms + 1) // 2)
            if any(not _agree(reading, kept) for kept in self._readings):
                self._readings.clear()  # a clock stepped since: the older readings are stale
            self._readings.append(reading)
        self.offset_ms, self.error_ms = min(reversed(self._readings), key=lambda r: r[1])
        self.synced = True
        return True

    @property
    def trusted(self) -> bool:
        """Whether this host may lead: its clock was compared with the store's and is within
        `max_offset_ms` of it."""
        return self.synced and abs(self.offset_ms) <= self.max_offset_ms


def _agree(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether two (offset, error) readings can both be right."""
    return abs(a[0] - b[0]) <= a[1] + b[1] + CLOCK_JITTER_MS


async def read_store_clock(
    clock: StoreClock, read_store_ms: Callable[[], Awaitable[int | None]]
) -> bool:
    """Read the store's clock once (`read_store_ms`) and correct `clock` by it; return whether
    the reading was used."""
    sent_ms = clock.local.now_ms()
    store_ms = await read_store_ms()
    return clock.observe(sent_ms, store_ms, clock.local.now_ms())
