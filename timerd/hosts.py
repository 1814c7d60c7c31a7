"""The per-host in-flight limit, and the due timers waiting for a slot at their host.

A timer whose host is at `TIMERD_PER_HOST_CONCURRENCY` is not claimed: it stays pending (and
cancellable) and is *parked* here until that host has slots again, so one slow receiver holds
only its own slots. Parked entries are released in batches, so their claims share writes. The
parked entries are bounded: past the bound they are dropped (still pending in the store, a
later poll reads them again), and the poll skips the hosts whose parking is full.
"""

from __future__ import annotations

import heapq
import urllib.parse
from collections import Counter
from typing import NamedTuple

from timerd.models import Due, Timer
from timerd.targets import origin_match


class Entry(NamedTuple):
    """A due timer the window holds: when it is due, its id, and the host it takes a slot at
    (ordered by due time first, so entries make a heap)."""

    due_at_ms: int
    timer_id: str
    host: str

    @classmethod
    def of(cls, timer: Due | Timer) -> Entry:
        """The entry of a timer read from the due index, or created or moved in this process."""
        return cls(timer.due_at_ms, timer.id, host_of(timer.url))


def host_of(url: str) -> str:
    """The host (and port) a URL's deliveries count against."""
    match = origin_match(url)  # what urlsplit reads, at a tenth of the cost
    return (urllib.parse.urlsplit(url).netloc if match is None else match.group(1)).lower()


class HostSlots:
    """In-flight deliveries per host, and the parked due entries of the hosts that are full."""

    def __init__(self, per_host: int, park_limit: int) -> None:
        self.per_host = per_host
        self.park_limit = park_limit  # entries parked per host, and (times 4) in all
        self.release_batch = max(1, per_host // 2)
        self._inflight: Counter[str] = Counter()
        self._released: Counter[str] = Counter()  # released to the window, not taken yet
        self._parked: dict[str, list[Entry]] = {}
        self._parked_ids: set[str] = set()

    @property
    def parked(self) -> int:
        """How many due entries wait for their host."""
        return len(self._parked_ids)

    @property
    def held(self) -> int:
        """Slots taken by deliveries, or promised to entries released back to the window."""
        return sum(self._inflight.values()) + sum(self._released.values())

    def take(self, entry: Entry) -> bool:
        """Take a slot at the entry's host; when there is none, park the entry and say no."""
        host = entry.host
        if self._released[host] > 0:
            self._released[host] -= 1
        if self._inflight[host] < self.per_host:
            self._inflight[host] += 1
            return True
        self._park(entry)
        return False

    def give_back(self, host: str) -> list[Entry]:
        """Free a slot (a delivery ended, or a taken timer was not claimed after all); return
        the parked entries to put back in the window, earliest due first, once enough slots
        are free to claim them together."""
        self._inflight[host] -= 1
        if self._inflight[host] <= 0:
            del self._inflight[host]
        heap = self._parked.get(host)
        free = self.per_host - self._inflight[host] - self._released[host]
        if not heap or free < min(self.release_batch, len(heap)):
            return []
        released = [heapq.heappop(heap) for _ in range(min(free, len(heap)))]
        self._released[host] += len(released)
        self._parked_ids.difference_update(entry.timer_id for entry in released)
        if not heap:
            del self._parked[host]
        return released

    def wanted(self, entry: Entry) -> bool:
        """Whether a polled entry should enter the window: not parked already, and not of a
        host whose parking is full."""
        if entry.timer_id in self._parked_ids:
            return False
        return len(self._parked.get(entry.host, ())) < self.park_limit

    def clear_parked(self) -> None:
        """Forget the parked entries (they are still pending in the store)."""
        self._parked.clear()
        self._parked_ids.clear()
        self._released.clear()

    def _park(self, entry: Entry) -> None:
        parked_here = len(self._parked.get(entry.host, ()))
        full = parked_here >= self.park_limit or self.parked >= 4 * self.park_limit
        if entry.timer_id in self._parked_ids or full:
            return  # dropped: still pending in the store; a later poll reads it again
        heapq.heappush(self._parked.setdefault(entry.host, []), entry)
        self._parked_ids.add(entry.timer_id)
