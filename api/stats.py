"""`GET /stats`: one tenant's timers at a glance, read from the store (the console's overview).

Every figure comes from a handful of bounded queries: counts by state and the earliest pending
timer of the tenant, its newest `RECENT` fired and failed timers (the recent figures are taken
from those, as `timerd status` does), and the leases (who fires). Each replica reads a
tenant's figures at most once every `FRESH_S`, however many consoles poll it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from api.views import rfc3339
from timerd.lease import live_daemons
from timerd.models import AttemptRecord, Due, Lease, State, Timer
from timerd.store import Store

RECENT = 200  # newest fired and failed timers the recent figures come from
WINDOW_MS = 300_000  # "recent": the last five minutes
RATE_WINDOW_MS = 60_000  # fired per second: over the last minute
FRESH_S = 1.0  # how stale a tenant's figures may be on one replica


def take_stats(store: Store, tenant: str, now_ms: int) -> dict[str, Any]:
    """The JSON object of `GET /stats` for `tenant`, as of `now_ms`."""
    counts = store.count_by_state_of(tenant)
    fired = store.list_timers(State.FIRED, None, RECENT, tenant)
    failed = store.list_timers(State.FAILED, None, RECENT, tenant)
    return {
        "now": rfc3339(now_ms),
        "counts": {state.value: counts.get(state, 0) for state in State},
        "backlog": {
            "pending": counts.get(State.PENDING, 0),
            "next": _next_due(store.earliest_pending_of(tenant), now_ms),
        },
        "recent": _recent(fired, failed, now_ms),
        "firing": _firing(store.leases(), store.partitions(), now_ms),
    }


def _next_due(due: Due | None, now_ms: int) -> dict[str, Any] | None:
    if due is None:
        return None
    overdue_ms = max(0, now_ms - due.due_at_ms)
    return {"id": due.id, "fire_at": rfc3339(due.due_at_ms), "overdue_ms": overdue_ms}


def _recent(fired: Sequence[Timer], failed: Sequence[Timer], now_ms: int) -> dict[str, Any]:
    since_ms = now_ms - WINDOW_MS
    fired_at = [t.fired_at_ms for t in fired if t.fired_at_ms is not None]
    late_ms = sorted(
        t.fired_at_ms - t.due_at_ms
        for t in fired
        if t.fired_at_ms is not None and t.fired_at_ms >= since_ms
    )
    last_minute = sum(1 for at_ms in fired_at if at_ms >= now_ms - RATE_WINDOW_MS)
    dead = [t for t in failed if t.history and t.history[-1].at_ms >= since_ms]
    attempts = [r for t in (*fired, *failed) for r in t.history if r.at_ms >= since_ms]
    return {
        "window_s": WINDOW_MS // 1000,
        "sample": RECENT,
        "fired": len(late_ms),
        "fired_per_s": round(last_minute / (RATE_WINDOW_MS / 1000), 3),
        "failed": len(dead),
        "failed_attempts": sum(1 for r in attempts if not _succeeded(r)),
        "lateness_ms": _lateness(late_ms),
    }


def _succeeded(record: AttemptRecord) -> bool:
    return record.status is not None and 200 <= record.status < 300


def _lateness(late_ms: list[int]) -> dict[str, float] | None:
    """p50, p99 (nearest rank) and max of sorted lateness figures; None without any."""
    if not late_ms:
        return None
    p99 = late_ms[min(len(late_ms) - 1, int(len(late_ms) * 0.99))]
    return {"p50": float(statistics.median(late_ms)), "p99": p99, "max": late_ms[-1]}


def _firing(leases: list[Lease], partitions: int, now_ms: int) -> dict[str, Any]:
    """Who fires: the live daemons and how many of the partitions each holds."""
    daemons = live_daemons(leases, now_ms)
    return {
        "partitions": partitions,
        "held": sum(len(held) for held in daemons.values()),
        "daemons": [{"holder": d, "partitions": len(held)} for d, held in daemons.items()],
    }


class StatsCache:
    """`take_stats` per tenant, read again once older than `FRESH_S`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._taken: dict[str, tuple[dict[str, Any], float]] = {}  # tenant → (stats, at)
        self._lock = threading.Lock()

    def get(self, tenant: str, now_ms: int) -> dict[str, Any]:
        """`tenant`'s stats, at most `FRESH_S` old; blocking (call from a worker thread)."""
        now = time.monotonic()
        with self._lock:
            stats, at = self._taken.get(tenant, ({}, -FRESH_S))
        if now - at >= FRESH_S or not stats:
            stats = take_stats(self._store, tenant, now_ms)
            with self._lock:
                self._taken[tenant] = (stats, now)
        return stats
