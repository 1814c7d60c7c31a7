"""The store upgrades in place (a SQLite file, and a MongoDB database): a store written by the
previous release opens and works, every migration runs once, and a file from a newer timerd is
refused. Every hot query is served
by an index, so it costs the same however many finished timers the file keeps."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.support.mongomock_compat import mongomock_client
from timerd.errors import ConfigError
from timerd.models import Claim, State, Timer, new_claim_token, new_timer_id, partition_of
from timerd.store.mongo import MongoStore
from timerd.store.sqlite import (
    BY_IDEMPOTENCY_KEY_SQL,
    CALLBACKS_DUE_SQL,
    COLUMNS,
    COUNT_FIRING_SQL,
    COUNT_PENDING_SQL,
    PURGE_FINISHED_SQL,
    RECOVER_CALLBACKS_SQL,
    RECOVER_EXPIRED_SQL,
    SqliteStore,
)
from timerd.store.sqlite_schema import VERSION

RELEASE_0_1_0 = Path(__file__).parent / "fixtures" / "release-0.1.0.sql"
NOW_MS = 1_795_000_000_000  # the fixture's "now"


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "timerd.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(RELEASE_0_1_0.read_text())
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    return path


@pytest.fixture
def upgraded(old_file: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(str(old_file))
    yield store
    store.close()


def user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        return version


def test_a_file_of_the_first_release_is_upgraded_and_keeps_every_timer(
    old_file: Path, upgraded: SqliteStore
) -> None:
    assert user_version(old_file) == VERSION
    pending = upgraded.get("6b0c912909a000c549ae2f01")
    assert (pending.state, pending.payload, pending.headers, pending.max_attempts) == (
        State.PENDING,
        '{"order":1}',
        (("x-k", "v"),),
        3,
    )
    fired = upgraded.get("6b0c912909a000c549ae2f02", tenant="tenant-a")
    assert fired.history[0].response == "ok"
    assert fired.finished_at_ms == fired.fired_at_ms
    assert upgraded.find_by_idempotency_key("tenant-a", "key-1") == fired
    cancelled = upgraded.get("6b0c912909a000c549ae2f05")
    assert cancelled.finished_at_ms is not None  # counted from the upgrade
    assert [k.key_id for k in upgraded.list_keys()] == ["k1"]
    assert upgraded.leases() == []  # the one leader lease of 0.1.0 is gone


def test_an_upgraded_file_works_for_the_daemon(upgraded: SqliteStore) -> None:
    # the 0.1.0 claim, without a token, is swept like any expired claim
    assert upgraded.recover_expired(NOW_MS + 60_000, 10, 8) == 1
    assert upgraded.get("6b0c912909a000c549ae2f04").state is State.PENDING
    timer = Timer(id=new_timer_id(), url="https://r.example/h", due_at_ms=NOW_MS, created_at_ms=0)
    upgraded.insert(timer)
    claim = Claim("d", NOW_MS + 60_000, NOW_MS + 90_000, new_claim_token())
    ids = ["6b0c912909a000c549ae2f04", timer.id]
    assert sorted(t.id for t in upgraded.claim_due(ids, claim)) == sorted(ids)
    assert upgraded.purge_finished(NOW_MS, 10) == 1  # the fired one, finished long before


def test_processes_opening_an_old_file_at_once_migrate_it_once(old_file: Path) -> None:
    def open_close(_: int) -> int:
        with closing(SqliteStore(str(old_file), busy_timeout_ms=5_000)):
            return user_version(old_file)

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert set(pool.map(open_close, range(6))) == {VERSION}


def test_a_file_of_a_newer_timerd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "timerd.db"
    with closing(SqliteStore(str(path))):
        pass
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {VERSION + 1}")
    with pytest.raises(ConfigError, match="newer timerd"):
        SqliteStore(str(path))


def test_a_new_file_starts_at_the_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "timerd.db"
    with closing(SqliteStore(str(path))):
        pass
    assert user_version(path) == VERSION


HOT_QUERIES = {
    "list without state": (
        f"SELECT {COLUMNS} FROM timers WHERE tenant = ? ORDER BY id DESC",
        ("a",),
    ),
    "list with state": (
        f"SELECT {COLUMNS} FROM timers WHERE tenant = ? AND state = ? AND id < ? ORDER BY id DESC",
        ("a", "fired", "f" * 24),
    ),
    "list series": (
        f"SELECT {COLUMNS} FROM timers INDEXED BY timers_tenant_series"
        " WHERE tenant = ? AND schedule IS NOT NULL ORDER BY id DESC",
        ("a",),
    ),
    "tenant cap": (
        "SELECT count(*) FROM (SELECT 1 FROM timers INDEXED BY timers_tenant_state_id"
        " WHERE tenant = ? AND state = 'pending' LIMIT ?)",
        ("a", 5),
    ),
    "purge": (PURGE_FINISHED_SQL, (1, 5)),
    "count pending": (COUNT_PENDING_SQL, ()),
    "count firing": (COUNT_FIRING_SQL, ()),
    "idempotency": (BY_IDEMPOTENCY_KEY_SQL, ("a", "k")),
    "sweep": (
        RECOVER_EXPIRED_SQL.replace("{partitions}", ""),
        {"now": 1, "limit": 5, "max_attempts": 3},
    ),
    "callbacks due": (CALLBACKS_DUE_SQL.replace("{partitions}", ""), {"before": 1, "limit": 5}),
    "callbacks sweep": (
        RECOVER_CALLBACKS_SQL.replace("{partitions}", "AND partition IN (1, 2)"),
        {"now": 1, "limit": 5},
    ),
}


@pytest.mark.parametrize(("sql", "params"), HOT_QUERIES.values(), ids=HOT_QUERIES.keys())
def test_every_hot_query_is_served_by_an_index_without_sorting(
    tmp_path: Path, sql: str, params: Any
) -> None:
    path = tmp_path / "timerd.db"
    with closing(SqliteStore(str(path))):
        pass
    with closing(sqlite3.connect(path)) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert all("TEMP B-TREE" not in step for step in plan), plan
    table_steps = [step for step in plan if " timers" in step]
    assert table_steps and all("USING" in step and "INDEX" in step for step in table_steps), plan


def test_a_mongodb_database_of_the_first_release_is_upgraded_once() -> None:
    client = mongomock_client()
    db = client["timerd"]
    old_ids = [f"6b0c912909a000c549ae2f{i:02x}" for i in range(3)]
    for timer_id in old_ids:  # as 0.1.0 wrote them: no partition
        db["timers"].insert_one(
            {
                "_id": timer_id,
                "url": "https://r.example/h",
                "due_at_ms": NOW_MS,
                "created_at_ms": NOW_MS,
                "state": "pending",
                "attempts": 0,
                "tenant": "",
                # mongomock ignores the partial filter of a unique index built over existing
                # documents: distinct keys keep it from seeing duplicates where MongoDB would not
                "idempotency_key": f"k{timer_id}",
            }
        )
    db["leases"].insert_one({"_id": "leader", "holder": "old", "epoch": 2, "expires_at_ms": 0})

    store = MongoStore(client, "timerd")
    assert [d["partition"] for d in db["timers"].find().sort("_id", 1)] == [
        partition_of(i, store.partitions()) for i in old_ids
    ]
    assert store.leases() == []
    assert [due.id for due in store.pending_due(NOW_MS + 1, 10)] == old_ids
    marker = db["meta"].find_one({"_id": "upgraded"})
    assert marker is not None and marker["value"] >= 1

    db["timers"].update_many({}, {"$unset": {"partition": ""}})  # a second start does not scan
    MongoStore(client, "timerd")
    assert db["timers"].count_documents({"partition": {"$exists": True}}) == 0
