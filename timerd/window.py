"""The lookahead window: the due timers a daemon knows of and has not claimed yet.

A poll reads the due index of the partitions held, up to `lookahead_s` ahead, never claiming;
inserts announced in this process join between polls. The entries wait in a heap by due time,
so the daemon can sleep until the earliest and claim exactly what is due. Each entry taken
holds a slot at its host (`HostSlots`); what its host has no slot for is parked there.
Memory holds at most about one batch of entries, whatever the backlog.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Sequence

from timerd.clock import Clock
from timerd.hosts import Entry, HostSlots
from timerd.models import Due

MAX_PAGES_PER_POLL = 4  # of the due index read past parked hosts' timers in one poll

# Read one page of the due index: (horizon_ms, limit, after (due_at_ms, id) or None).
ReadPage = Callable[[int, int, tuple[int, str] | None], Awaitable[Sequence[Due]]]


class DueWindow:
    """Due entries in a heap by due time, the per-host slots they take, and when to poll."""

    def __init__(
        self, hosts: HostSlots, batch_size: int, poll_interval_s: float, clock: Clock
    ) -> None:
        self.hosts = hosts
        self._clock = clock
        self._batch = batch_size
        self._poll_interval_s = poll_interval_s
        self._heap: list[Entry] = []
        self._full = False  # the last poll hit the batch size: more may be due behind it
        self._heard: list[Entry] = []  # announced while a poll was under way
        self._polling = False
        self._next_poll_s = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def earliest_ms(self) -> int | None:
        """When the earliest entry is due; None when the window is empty."""
        return self._heap[0].due_at_ms if self._heap else None

    def add(self, entry: Entry) -> None:
        """An entry announced between polls (a timer created or moved in this process)."""
        heapq.heappush(self._heap, entry)
        if self._polling:  # the poll under way replaces the heap: keep this one for after it
            self._heard.append(entry)

    def poll_is_due(self) -> bool:
        """Whether to read the due index now: the interval passed, or the window ran dry
        while more was due behind the last page."""
        drained = not self._heap and self._full and not self.hosts.parked
        return drained or self._clock.monotonic_s() >= self._next_poll_s

    def poll_soon(self) -> None:
        """Read the due index at the next step (claims came back, news of the store)."""
        self._next_poll_s = 0.0

    def forget(self) -> None:
        """Drop every entry and parked entry (still pending in the store) and poll next."""
        self._heap.clear()
        self.hosts.clear_parked()
        self._next_poll_s = 0.0

    async def poll(self, read_page: ReadPage, horizon_ms: int) -> None:
        """Replace the entries by the due index up to `horizon_ms`: those not parked already and
        not of hosts whose parking is full, reading on past those (a few pages at most) so one
        host's backlog cannot hide every other host's timers."""
        self._polling = True
        try:
            entries, full = await self._read(read_page, horizon_ms)
        finally:
            self._polling = False
        self._heap = entries + self._heard
        heapq.heapify(self._heap)
        self._heard = []
        self._full = full
        self._next_poll_s = self._clock.monotonic_s() + self._poll_interval_s

    async def _read(self, read_page: ReadPage, horizon_ms: int) -> tuple[list[Entry], bool]:
        entries: list[Entry] = []
        after: tuple[int, str] | None = None
        for _ in range(MAX_PAGES_PER_POLL):
            page = await read_page(horizon_ms, self._batch, after)
            polled = (Entry.of(due) for due in page)
            entries.extend(entry for entry in polled if self.hosts.wanted(entry))
            if len(page) < self._batch or len(entries) >= self._batch // 2:
                return entries, len(page) >= self._batch
            after = (page[-1].due_at_ms, page[-1].id)
        return entries, True

    def idle_s(self, now_ms: int) -> float:
        """How long the daemon may sleep: until the earliest entry or the next poll is due."""
        until_poll_s = max(0.0, self._next_poll_s - self._clock.monotonic_s())
        if not self._heap:
            return until_poll_s
        return max(0.0, min(until_poll_s, (self._heap[0].due_at_ms - now_ms) / 1000))

    def take_due(self, now_ms: int, limit: int, holds: Callable[[str], bool]) -> list[Entry]:
        """Pop what is due, up to `limit`, taking a slot at each host; park what cannot go,
        and drop the entries of timers `holds` says are no longer this daemon's."""
        taken: list[Entry] = []
        limit = min(limit, self._batch)
        while self._heap and self._heap[0].due_at_ms <= now_ms and len(taken) < limit:
            entry = heapq.heappop(self._heap)
            if not holds(entry.timer_id):
                continue  # handed over or lost since it was read: its new holder fires it
            if self.hosts.take(entry):
                taken.append(entry)
        return taken

    def give_back(self, host: str) -> bool:
        """Free a slot at `host`; its parked entries return to the heap once enough are free.
        Says whether any returned."""
        released = self.hosts.give_back(host)
        for entry in released:
            heapq.heappush(self._heap, entry)
        return bool(released)
