"""Store calls made on the daemon's event loop (`Store.nonblocking`, `offload.hybrid_offload`):
SQLite makes them at once or says it would have waited, having changed nothing, and the daemon
then makes them in a thread; the loop's connection leaves checkpoints to `checkpoint`."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.mongomock_compat import mongomock_client
from timerd.errors import WouldBlock
from timerd.models import Claim, Outcome, State, Timer, new_claim_token, new_timer_id
from timerd.offload import hybrid_offload
from timerd.store import open_store
from timerd.store.base import Store
from timerd.store.mongo import MongoStore
from timerd.store.sqlite import SqliteStore

T = TypeVar("T")
NOW_MS = 1_700_000_000_000


@pytest.fixture
def daemon_store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A SQLite store as the daemon opens it (commits that do not wait for the disk)."""
    store = open_store(f"sqlite:///{tmp_path / 'timerd.db'}", for_daemon=True)
    assert isinstance(store, SqliteStore)
    yield store
    store.close()


def on_the_loop(store: SqliteStore) -> AbstractContextManager[None]:
    """The store's `nonblocking()` context, which a daemon's store offers."""
    context = store.nonblocking()
    assert context is not None
    return context


def due_timers(store: Store, n: int, payload: str | None = None) -> list[str]:
    timers = [
        Timer(
            id=new_timer_id(),
            url=f"http://127.0.0.1:9/hooks/{i}",
            due_at_ms=NOW_MS,
            created_at_ms=NOW_MS,
            payload=payload,
        )
        for i in range(n)
    ]
    return [t.id for t in store.insert_many(timers)]


def claim(owner: str = "daemon") -> Claim:
    return Claim(owner, NOW_MS, NOW_MS + 60_000, new_claim_token())


def fire(store: Store, ids: list[str]) -> None:
    """Claim `ids` and record each as delivered."""
    c = claim()
    claimed = store.claim_due(ids, c)
    assert len(claimed) == len(ids)
    outcomes = [Outcome(t.id, c.token, State.FIRED, NOW_MS + 1, status=200) for t in claimed]
    assert store.complete(outcomes) == len(ids)


def test_claims_polls_and_outcomes_are_made_on_the_calling_thread(
    daemon_store: SqliteStore,
) -> None:
    ids = due_timers(daemon_store, 3)
    context = on_the_loop(daemon_store)
    with context:
        assert sorted(d.id for d in daemon_store.pending_due(NOW_MS + 1, 10)) == sorted(ids)
        fire(daemon_store, ids)
    assert {daemon_store.get(i).state for i in ids} == {State.FIRED}


def test_a_write_another_process_holds_the_lock_for_would_block_and_changes_nothing(
    daemon_store: SqliteStore,
) -> None:
    [timer_id] = due_timers(daemon_store, 1)
    context = on_the_loop(daemon_store)
    with closing(sqlite3.connect(daemon_store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process's write in progress
        started = time.monotonic()
        with context, pytest.raises(WouldBlock):
            daemon_store.claim_due([timer_id], claim())
        assert time.monotonic() - started < 0.1, "it waited for the lock"
        with context:  # reads never wait in WAL mode
            assert [d.id for d in daemon_store.pending_due(NOW_MS + 1, 10)] == [timer_id]
        other.execute("COMMIT")
    assert daemon_store.get(timer_id).state is State.PENDING
    with context:
        fire(daemon_store, [timer_id])  # and once the lock is free, at once


def test_only_stores_whose_calls_need_no_wait_offer_them(tmp_path: Path) -> None:
    full = open_store(f"sqlite:///{tmp_path / 'full.db'}?synchronous=FULL", for_daemon=True)
    mongo = MongoStore(mongomock_client(), "timerd")
    try:
        assert full.nonblocking() is None  # each commit waits for the disk
        assert mongo.nonblocking() is None  # each call is a round trip
    finally:
        full.close()
        mongo.close()


def test_the_loops_connection_never_checkpoints_and_checkpoint_does(
    daemon_store: SqliteStore,
) -> None:
    wal = Path(daemon_store.path + "-wal")
    payload = '"' + "x" * 1000 + '"'  # four rows to a page
    ids = [i for _ in range(50) for i in due_timers(daemon_store, 100, payload)]
    context = on_the_loop(daemon_store)

    def wal_pages_after_firing(ids: list[str]) -> int:
        with context:
            for start in range(0, len(ids), 50):  # small transactions, as in a burst
                fire(daemon_store, ids[start : start + 50])
        return wal.stat().st_size // 4096

    first = wal_pages_after_firing(ids[:2500])
    assert first > 1500  # SQLite's autocheckpoint would have started the log over at 1,000
    daemon_store.checkpoint()
    second = wal_pages_after_firing(ids[2500:])
    assert second < first * 1.2  # it started over after the checkpoint instead of growing


def test_the_hybrid_offload_runs_on_the_loop_and_elsewhere_only_when_it_would_block(
    daemon_store: SqliteStore,
) -> None:
    ids = due_timers(daemon_store, 2)
    context = on_the_loop(daemon_store)
    sent_elsewhere: list[str] = []

    async def elsewhere(call: Callable[[], T]) -> T:
        sent_elsewhere.append(call.__name__)
        return await asyncio.to_thread(call)

    offload = hybrid_offload(context, elsewhere)

    def claim_first() -> list[Timer]:
        return daemon_store.claim_due(ids[:1], claim())

    def claim_second() -> list[Timer]:
        return daemon_store.claim_due(ids[1:], claim())

    async def scenario() -> None:
        assert [t.id for t in await offload(claim_first)] == ids[:1]
        assert sent_elsewhere == []
        with closing(sqlite3.connect(daemon_store.path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            claiming = asyncio.ensure_future(offload(claim_second))
            await asyncio.sleep(0.05)
            assert not claiming.done()  # waiting in a thread, not on the loop
            other.execute("COMMIT")
        assert [t.id for t in await claiming] == ids[1:]
        assert sent_elsewhere == ["claim_second"]

    asyncio.run(scenario())
