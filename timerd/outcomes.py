"""Writing delivery outcomes back to the store in batches.

At thousands of deliveries a second one write per outcome would cost more than the deliveries;
outcomes that arrive while a write is under way go together in the next one.
"""

from __future__ import annotations

import asyncio

import structlog

from timerd.errors import StoreUnavailable
from timerd.models import Outcome
from timerd.store import Store

log = structlog.get_logger("timerd.outcomes")

MAX_BATCH = 1000
GATHER_S = 0.005
RETRY_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class OutcomeWriter:
    """Queues outcomes and writes them with `Store.complete`, retrying while the store is down."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[Outcome] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, outcome: Outcome) -> None:
        """Queue one outcome for the next write."""
        self._queue.append(outcome)
        self._idle.clear()
        self._ready.set()

    async def run(self) -> None:
        """Write queued outcomes until cancelled."""
        failures = 0
        while True:
            await self._ready.wait()
            await asyncio.sleep(GATHER_S)  # let the outcomes of the next few ms join this write
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                applied = await asyncio.to_thread(self._store.complete, batch)
            except StoreUnavailable as exc:
                self._queue[:0] = batch  # keep them, in order, for the next try
                delay = RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S) - 1)]
                failures += 1
                log.warning("outcomes_store_unavailable", error=str(exc), queued=len(self._queue))
                await asyncio.sleep(delay)
                continue
            failures = 0
            if applied < len(batch):
                log.debug("outcomes_superseded", ignored=len(batch) - applied)
            if not self._queue:
                self._ready.clear()
                self._idle.set()

    async def drained(self) -> None:
        """Return once every queued outcome has been written."""
        await self._idle.wait()
