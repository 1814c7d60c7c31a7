"""The SQLite file's schema, as numbered migrations recorded in `PRAGMA user_version`.

A file is brought up to date when a store opens it, under the write lock, one migration per
transaction, so processes that open it at once never apply one twice. Version 1 is the schema of
the first release, 0.1.0, which kept no version: its migration also completes files that release
left without its later columns. Never edit a migration once released; add the next one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from timerd.errors import ConfigError
from timerd.models import PARTITIONS, partition_of

T = TypeVar("T")

FIRST_RELEASE = """
CREATE TABLE IF NOT EXISTS timers (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    due_at_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    fired_at_ms INTEGER,
    claimed_by TEXT,
    claimed_until_ms INTEGER,
    epoch INTEGER,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS timers_pending_due ON timers (due_at_ms, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS timers_firing_claim ON timers (claimed_until_ms)
    WHERE state = 'firing';
CREATE INDEX IF NOT EXISTS timers_state_id ON timers (state, id);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
"""
# Columns 0.1.0 added to files made by its own earlier builds.
FIRST_RELEASE_COLUMNS = {
    "payload": "TEXT",
    "headers": "TEXT",
    "max_attempts": "INTEGER",
    "history": "TEXT",
    "tenant": "TEXT NOT NULL DEFAULT ''",
    "idempotency_key": "TEXT",
    "request_hash": "TEXT",
}
FIRST_RELEASE_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS timers_idempotency ON timers (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS timers_tenant_state_id ON timers (tenant, state, id);
"""


def _first_release(conn: sqlite3.Connection) -> None:
    _execute_all(conn, FIRST_RELEASE)
    for name, kind in FIRST_RELEASE_COLUMNS.items():
        _add_column(conn, name, kind)
    _execute_all(conn, FIRST_RELEASE_INDEXES)


def _claim_tokens(conn: sqlite3.Connection) -> None:
    """Outcomes and releases name the claim they belong to."""
    _add_column(conn, "claim_token", "TEXT")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS timers_firing_token ON timers (claim_token)"
        " WHERE state = 'firing'"
    )


def _retention_and_listing(conn: sqlite3.Connection) -> None:
    """When a timer finished (for retention), and a tenant's newest-first listing without a
    state filter served by an index. Timers finished before this migration count from now."""
    _add_column(conn, "finished_at_ms", "INTEGER")
    conn.execute(
        "UPDATE timers SET finished_at_ms = COALESCE(fired_at_ms, ?)"
        " WHERE state IN ('fired', 'failed', 'cancelled')",
        (time.time_ns() // 1_000_000,),
    )
    _execute_all(
        conn,
        """
        CREATE INDEX IF NOT EXISTS timers_finished ON timers (finished_at_ms)
            WHERE finished_at_ms IS NOT NULL;
        CREATE INDEX IF NOT EXISTS timers_tenant_id ON timers (tenant, id);
        """,
    )


def _partitions(conn: sqlite3.Connection) -> None:
    """The timer space in PARTITIONS partitions, each with a lease of its own instead of the
    one leader lease: the due and claim indexes carry the partition, so a daemon reads only its
    own partitions' timers from the index alone. Fired timers say which daemon fired them."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('partitions', ?)", (PARTITIONS,))
    partitions = conn.execute("SELECT value FROM meta WHERE name = 'partitions'").fetchone()[0]
    _add_column(conn, "partition", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "fired_by", "TEXT")
    conn.create_function("partition_of", 1, lambda i: partition_of(i, partitions))
    conn.execute("UPDATE timers SET partition = partition_of(id)")
    _execute_all(
        conn,
        """
        DROP INDEX IF EXISTS timers_pending_due;
        CREATE INDEX IF NOT EXISTS timers_pending_due ON timers (due_at_ms, id, partition)
            WHERE state = 'pending';
        DROP INDEX IF EXISTS timers_firing_claim;
        CREATE INDEX IF NOT EXISTS timers_firing_claim ON timers (claimed_until_ms, partition)
            WHERE state = 'firing';
        DELETE FROM leases WHERE name = 'leader'
        """,
    )


def _series(conn: sqlite3.Connection) -> None:
    """Recurring timers: a series keeps its schedule (JSON text), the number and scheduled time
    of its current occurrence and how many of its occurrences failed; a tenant's series are
    listed newest first from an index over series alone."""
    _add_column(conn, "schedule", "TEXT")
    _add_column(conn, "occurrence", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "occurrence_at_ms", "INTEGER")
    _add_column(conn, "occurrences_failed", "INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS timers_tenant_series ON timers (tenant, id)"
        " WHERE schedule IS NOT NULL"
    )


def _failure_callbacks(conn: sqlite3.Connection) -> None:
    """Failure callbacks: a timer's `on_failure_url` and its callback's delivery state, due time,
    attempts and claim; partial indexes over pending callbacks (by due time) and firing ones
    (by claim deadline) alone, with the partition, as for timers."""
    _add_column(conn, "on_failure_url", "TEXT")
    _add_column(conn, "callback_state", "TEXT")
    _add_column(conn, "callback_due_at_ms", "INTEGER")
    _add_column(conn, "callback_attempts", "INTEGER NOT NULL DEFAULT 0")
    _add_column(conn, "callback_token", "TEXT")
    _add_column(conn, "callback_until_ms", "INTEGER")
    _add_column(conn, "callback_status", "INTEGER")
    _add_column(conn, "callback_error", "TEXT")
    _add_column(conn, "callback_occurrence", "INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS timers_callbacks_due ON timers"
        " (callback_due_at_ms, partition) WHERE callback_state = 'pending'"
    )
    conn.execute(
        "CREATE INDEX IF NOT EXISTS timers_callbacks_firing ON timers"
        " (callback_until_ms, partition) WHERE callback_state = 'firing'"
    )


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (
    _first_release,
    _claim_tokens,
    _retention_and_listing,
    _partitions,
    _series,
    _failure_callbacks,
)
VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the file lacks; return the version it is at now. Raises
    `ConfigError` for a file written by a newer timerd."""
    while True:
        with transaction(conn):
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                raise ConfigError(
                    f"TIMERD_STORE: the file is at schema version {version}, written by a newer"
                    f" timerd; this one knows versions up to {VERSION}"
                )
            if version == VERSION:
                return version
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of `script` inside the caller's transaction (`executescript` would
    commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _add_column(conn: sqlite3.Connection, name: str, kind: str) -> None:
    present = {row[1] for row in conn.execute("PRAGMA table_info(timers)")}
    if name not in present:
        conn.execute(f"ALTER TABLE timers ADD COLUMN {name} {kind}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def use_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode. Processes opening a new file at once race for the lock this
    takes, and SQLite answers the losers "locked" at once instead of calling its busy handler;
    once the winner has switched, the PRAGMA is a no-op. So retry, within the busy timeout."""
    retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"), timeout_s)


def retry_locked(work: Callable[[], T], timeout_s: float) -> T:
    """`work()`, tried again while SQLite answers "database is locked", for up to `timeout_s`:
    after 0.2 ms, then twice as long each time up to 5 ms (SQLite's own busy handler sleeps
    1, 2, 5, 10 ms..., far longer than another process holds the lock for one write)."""
    deadline = time.monotonic() + timeout_s
    delay_s = 0.0002
    while True:
        try:
            return work()
        except sqlite3.OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay_s)
        delay_s = min(2 * delay_s, 0.005)
