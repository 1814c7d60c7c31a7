"""Helpers for end-to-end tests with real `timerd` processes on one SQLite file: fast lease
settings, starting a daemon (as leader or standby), who leads, and what the store holds."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Arrival
from tests.support.waiting import wait_until
from timerd.models import State
from timerd.store import open_store

TTL_S, POLL_S = 2.0, 0.5
FAST = {
    "TIMERD_LEASE_TTL_S": str(TTL_S),
    "TIMERD_LEASE_RENEW_S": "0.5",
    "TIMERD_POLL_INTERVAL_S": str(POLL_S),
    "TIMERD_CONNECT_TIMEOUT_S": "1",
    "TIMERD_DELIVERY_TIMEOUT_S": "2",  # claims then expire 5 s after they were made
    "TIMERD_DRAIN_GRACE_S": "5",
}


def store_url(db: Path) -> str:
    return f"sqlite:///{db}"


def start_daemon(
    procs: TimerdProcesses, db: Path, *, lead: bool = True, **env: str
) -> TimerdProcess:
    """A `timerd daemon`; with `lead`, return once it holds the lease."""
    daemon = procs.start("daemon", store_url(db), env=FAST | env, ready=False)
    if lead:
        wait_until(lambda: leader_pid(db) == daemon.pid, 10, "the daemon to take the lease")
    else:
        wait_until(lambda: '"daemon_started"' in daemon.stderr(), 10, "the daemon to start")
    return daemon


def leader_pid(db: Path) -> int | None:
    """The pid of the daemon holding partition 0's live lease (its holder is
    `host:pid:random`), or None: alone, a daemon holds every partition."""
    store = open_store(store_url(db))
    try:
        lease = store.get_lease("p0")
    finally:
        store.close()
    live = lease is not None and lease.expires_at_ms > time.time() * 1000
    return int(lease.holder.split(":")[1]) if live and lease else None


def rfc3339(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def states(db: Path, ids: list[str]) -> Counter[State]:
    store = open_store(store_url(db))
    try:
        return Counter(store.get(i).state for i in ids)
    finally:
        store.close()


def ids_in_state(db: Path, state: State) -> set[str]:
    """Every timer id in `state` right now, read page by page through the store contract."""
    store = open_store(store_url(db))
    found: set[str] = set()
    cursor: str | None = None
    try:
        while page := store.list_timers(state, cursor, 100):
            found.update(t.id for t in page)
            cursor = page[-1].id
    finally:
        store.close()
    return found


def ids_in(arrivals: list[Arrival]) -> Counter[str]:
    return Counter(a.timer_id for a in arrivals)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
