"""Time sources: wall-clock milliseconds for due times, a monotonic clock for intervals."""

from __future__ import annotations

import time
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
