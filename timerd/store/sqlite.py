"""The embedded store: one SQLite file in WAL mode, for a single host.

The API's writes (creates, cancels, changes, replays) from many threads share commits through one
writer thread (group commit), so durable `synchronous=FULL` commits do not cap them at one fsync
each and they never race one another for SQLite's lock. Every other operation is a single
statement on a per-thread connection; SQLite serialises writers across processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from timerd.errors import StoreUnavailable, TimerNotFound, TimerStateConflict
from timerd.models import (
    HISTORY_MAX,
    ApiKey,
    Claim,
    Due,
    Lease,
    Outcome,
    State,
    Timer,
    TimerChanges,
    history_from_dicts,
    history_to_dicts,
    is_timer_id,
)
from timerd.store.base import CLAIM_EXPIRED, LEASE_NAME, Store

T = TypeVar("T")

COLUMNS = (
    "id, url, due_at_ms, created_at_ms, state, attempts, fired_at_ms, claimed_by,"
    " claimed_until_ms, epoch, last_status, last_error, payload, headers, max_attempts, history,"
    " tenant, idempotency_key, request_hash, claim_token"
)
# OR IGNORE: a second timer with a tenant's idempotency key is not inserted (see `insert`).
INSERT_SQL = f"INSERT OR IGNORE INTO timers ({COLUMNS}) VALUES ({', '.join('?' * 20)})"
BY_IDEMPOTENCY_KEY_SQL = f"SELECT {COLUMNS} FROM timers WHERE tenant = ? AND idempotency_key = ?"

# Columns added after the first schema, created on files that predate them.
ADDED_COLUMNS = {
    "payload": "TEXT",
    "headers": "TEXT",
    "max_attempts": "INTEGER",
    "history": "TEXT",
    "tenant": "TEXT NOT NULL DEFAULT ''",
    "idempotency_key": "TEXT",
    "request_hash": "TEXT",
    "claim_token": "TEXT",
}
# Indexes on added columns, created once the columns exist.
LATER_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS timers_idempotency ON timers (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS timers_tenant_state_id ON timers (tenant, state, id);
CREATE INDEX IF NOT EXISTS timers_firing_token ON timers (claim_token) WHERE state = 'firing';
"""

SCHEMA = """
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

# INDEXED BY: the planner would otherwise take timers_state_id (state = ?) and sort.
PENDING_DUE_SQL = (
    "SELECT id, due_at_ms, url FROM timers INDEXED BY timers_pending_due"
    " WHERE state = 'pending' AND due_at_ms < ? ORDER BY due_at_ms, id LIMIT ?"
)
PENDING_DUE_AFTER_SQL = (
    "SELECT id, due_at_ms, url FROM timers INDEXED BY timers_pending_due"
    " WHERE state = 'pending' AND due_at_ms < ? AND (due_at_ms, id) > (?, ?)"
    " ORDER BY due_at_ms, id LIMIT ?"
)
NEXT_DUE_SQL = (
    "SELECT MIN(due_at_ms) FROM timers INDEXED BY timers_pending_due WHERE state = 'pending'"
)

ACQUIRE_LEASE_SQL = """
INSERT INTO leases (name, holder, epoch, expires_at_ms) VALUES (:name, :holder, 1, :expires)
ON CONFLICT (name) DO UPDATE SET
    epoch = CASE WHEN holder = excluded.holder THEN epoch ELSE epoch + 1 END,
    holder = excluded.holder,
    expires_at_ms = excluded.expires_at_ms
WHERE holder = excluded.holder OR expires_at_ms < :now
RETURNING holder, epoch, expires_at_ms
"""

# The history grows by one entry per attempt and drops its oldest past HISTORY_MAX.
_APPEND_HISTORY = f"""(
    SELECT CASE WHEN json_array_length(h) > {HISTORY_MAX} THEN json_remove(h, '$[0]') ELSE h END
    FROM (SELECT json_insert(COALESCE(history, '[]'), '$[#]', json({{record}})) AS h)
)"""
_EXPIRED_RECORD = (
    "json_object('attempt', attempts, 'at_ms', :now, 'latency_ms', 0, 'status', NULL,"
    f" 'error', '{CLAIM_EXPIRED}', 'response', NULL)"
)
COMPLETE_SQL = f"""
UPDATE timers SET state = :state, fired_at_ms = COALESCE(:fired_at_ms, fired_at_ms),
    due_at_ms = COALESCE(:next_due_at_ms, due_at_ms), last_status = :status,
    last_error = :error, claimed_by = NULL, claimed_until_ms = NULL, claim_token = NULL,
    history = CASE WHEN :record IS NULL THEN history
        ELSE {_APPEND_HISTORY.format(record=":record")} END
WHERE id = :id AND state = 'firing' AND claim_token = :token
"""

RELEASE_CLAIM_SQL = """
UPDATE timers SET state = 'pending', attempts = attempts - 1, claimed_by = NULL,
    claimed_until_ms = NULL, claim_token = NULL
WHERE claim_token = ? AND state = 'firing'
"""

# An expired claim counts as a failed attempt: failed once the budget is spent, else pending.
RECOVER_EXPIRED_SQL = f"""
UPDATE timers SET
    state = CASE WHEN attempts >= COALESCE(max_attempts, :max_attempts)
        THEN 'failed' ELSE 'pending' END,
    claimed_by = NULL, claimed_until_ms = NULL, claim_token = NULL,
    last_status = NULL, last_error = '{CLAIM_EXPIRED}',
    history = {_APPEND_HISTORY.format(record=_EXPIRED_RECORD)}
WHERE id IN (
    SELECT id FROM timers WHERE state = 'firing' AND claimed_until_ms < :now LIMIT :limit
)
"""

KEY_COLUMNS = "key_id, name, tenant, secret_hash, created_at_ms, revoked_at_ms"

_GROUP_COMMIT_MAX = 1000


def _to_timer(row: Sequence[Any]) -> Timer:
    return Timer(
        id=row[0],
        url=row[1],
        due_at_ms=row[2],
        created_at_ms=row[3],
        state=State(row[4]),
        attempts=row[5],
        fired_at_ms=row[6],
        claimed_by=row[7],
        claimed_until_ms=row[8],
        epoch=row[9],
        last_status=row[10],
        last_error=row[11],
        payload=row[12],
        headers=tuple((k, v) for k, v in json.loads(row[13] or "[]")),
        max_attempts=row[14],
        history=history_from_dicts(json.loads(row[15] or "[]")),
        tenant=row[16],
        idempotency_key=row[17],
        request_hash=row[18],
        claim_token=row[19],
    )


def _insert_params(t: Timer) -> tuple[Any, ...]:
    return (
        t.id,
        t.url,
        t.due_at_ms,
        t.created_at_ms,
        t.state.value,
        t.attempts,
        t.fired_at_ms,
        t.claimed_by,
        t.claimed_until_ms,
        t.epoch,
        t.last_status,
        t.last_error,
        t.payload,
        json.dumps(t.headers) if t.headers else None,
        t.max_attempts,
        json.dumps(history_to_dicts(t.history)) if t.history else None,
        t.tenant,
        t.idempotency_key,
        t.request_hash,
        t.claim_token,
    )


def _complete_params(o: Outcome) -> dict[str, Any]:
    return {
        "id": o.timer_id,
        "token": o.claim_token,
        "state": o.state.value,
        "fired_at_ms": o.at_ms if o.state is State.FIRED else None,
        "next_due_at_ms": o.next_due_at_ms if o.state is State.PENDING else None,
        "status": o.status,
        "error": o.error,
        "record": None if o.record is None else json.dumps(o.record.as_dict()),
    }


@contextmanager
def translate_errors() -> Iterator[None]:
    """The one place SQLite errors that mean "try again" become `StoreUnavailable`."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, unreadable file, disk full
        raise StoreUnavailable(f"sqlite: {exc}") from exc


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _use_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode. Processes opening a new file at once race for the lock this
    takes, and SQLite answers the losers "locked" at once instead of calling its busy handler;
    once the winner has switched, the PRAGMA is a no-op. So retry, within the busy timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    # Look and add under the write lock: two processes opening the file at once would otherwise
    # both see a column missing and the second ALTER would fail ("duplicate column name").
    with _transaction(conn):
        present = {row[1] for row in conn.execute("PRAGMA table_info(timers)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                conn.execute(f"ALTER TABLE timers ADD COLUMN {name} {kind}")


def _insert_one(conn: sqlite3.Connection, timer: Timer) -> Timer:
    """Insert, or return the tenant's timer that already has this idempotency key."""
    if conn.execute(INSERT_SQL, _insert_params(timer)).rowcount == 1:
        return timer
    row = conn.execute(BY_IDEMPOTENCY_KEY_SQL, (timer.tenant, timer.idempotency_key)).fetchone()
    if row is None:  # not an idempotency clash: the id itself exists, which cannot happen
        raise sqlite3.IntegrityError(f"timer {timer.id} exists")
    return _to_timer(row)


Work = Callable[[sqlite3.Connection], Any]
_Pending = tuple[Work, "concurrent.futures.Future[Any]"]


class _GroupCommitter:
    """One thread that runs every write queued meanwhile in a single transaction (one fsync),
    and the only writer of its store's API writes, so they never race for SQLite's lock."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="timerd-sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue `work` (statements on the writer's connection) for the next transaction."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((work, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        conn = self._connect()
        try:
            while (batch := self._next_batch()) is not None:
                self._commit(conn, batch)
        finally:
            conn.close()

    def _next_batch(self) -> list[_Pending] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < _GROUP_COMMIT_MAX:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with translate_errors(), _transaction(conn):
                for work, _ in batch:
                    try:
                        outcomes.append((True, work(conn)))
                    except sqlite3.DatabaseError as exc:  # that statement alone was undone
                        outcomes.append((False, exc))
        except Exception as exc:  # every waiter must hear about the failure, whatever it was
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class SqliteStore(Store):
    """`Store` over one SQLite file.

    `synchronous` is SQLite's setting for this store's connections: FULL (the default) makes
    every commit survive power loss; NORMAL may lose the last commits on power loss (never on a
    process crash) and is what the daemon uses for its own writes.
    """

    def __init__(
        self, path: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 1000
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._writer: _GroupCommitter | None = None
        self._writer_lock = threading.Lock()
        with translate_errors():
            conn = self._conn()
            _use_wal(conn, busy_timeout_ms / 1000)
            conn.executescript(SCHEMA)
            _add_missing_columns(conn)
            conn.executescript(LATER_INDEXES)

    # connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with translate_errors():
            return work(self._conn())

    # timers

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in the writer thread's next transaction and wait for its commit."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = _GroupCommitter(self._connect)
            writer = self._writer
        with translate_errors():
            return writer.submit(work).result()

    def insert(self, timer: Timer) -> Timer:
        return self._write(lambda conn: _insert_one(conn, timer))

    def find_by_idempotency_key(self, tenant: str, key: str) -> Timer | None:
        row = self._run(lambda c: c.execute(BY_IDEMPOTENCY_KEY_SQL, (tenant, key)).fetchone())
        return None if row is None else _to_timer(row)

    def get(self, timer_id: str, tenant: str | None = None) -> Timer:
        if not is_timer_id(timer_id):
            raise TimerNotFound(timer_id)
        sql = f"SELECT {COLUMNS} FROM timers WHERE id = ?"
        row = self._run(lambda c: c.execute(sql, (timer_id,)).fetchone())
        if row is None or (tenant is not None and row[16] != tenant):
            raise TimerNotFound(timer_id)
        return _to_timer(row)

    def cancel(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        return self._update_in_state(timer_id, tenant, ("pending",), {"state": "cancelled"})

    def update_pending(
        self, timer_id: str, changes: TimerChanges, tenant: str | None = None
    ) -> Timer:
        values: dict[str, Any] = {
            "due_at_ms": changes.due_at_ms,
            "url": changes.url,
            "payload": changes.payload,
            "headers": None if changes.headers is None else json.dumps(changes.headers),
        }
        given = {name: value for name, value in values.items() if value is not None}
        return self._update_in_state(timer_id, tenant, ("pending",), given)

    def _update_in_state(
        self, timer_id: str, tenant: str | None, states: tuple[str, ...], values: dict[str, Any]
    ) -> Timer:
        """Set `values` on the timer if it is in one of `states` (and the tenant's)."""
        if not is_timer_id(timer_id):
            raise TimerNotFound(timer_id)
        assignments = ", ".join(f"{name} = ?" for name in values) or "id = id"
        sql = (
            f"UPDATE timers SET {assignments} WHERE id = ?"
            f" AND state IN ({', '.join('?' * len(states))}) AND (? IS NULL OR tenant = ?)"
            f" RETURNING {COLUMNS}"
        )
        params = (*values.values(), timer_id, *states, tenant, tenant)
        row = self._write(lambda c: c.execute(sql, params).fetchone())
        if row is not None:
            return _to_timer(row)
        raise TimerStateConflict(timer_id, self.get(timer_id, tenant).state.value)

    def count_pending(self, tenant: str) -> int:
        sql = "SELECT count(*) FROM timers WHERE tenant = ? AND state = 'pending'"
        count: int = self._run(lambda c: c.execute(sql, (tenant,)).fetchone()[0])
        return count

    def pending_due(
        self, before_ms: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Due]:
        sql: str = PENDING_DUE_SQL
        params: tuple[Any, ...] = (before_ms, limit)
        if after is not None:
            sql, params = PENDING_DUE_AFTER_SQL, (before_ms, *after, limit)
        rows = self._run(lambda c: c.execute(sql, params).fetchall())
        return [Due(id=r[0], due_at_ms=r[1], url=r[2]) for r in rows]

    def next_due_at_ms(self) -> int | None:
        row = self._run(lambda c: c.execute(NEXT_DUE_SQL).fetchone())
        return None if row is None else row[0]

    def count_by_state(self) -> dict[State, int]:
        sql = "SELECT state, count(*) FROM timers GROUP BY state"
        return {State(state): n for state, n in self._run(lambda c: c.execute(sql).fetchall())}

    def claim_due(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        if not timer_ids:
            return []
        marks = ", ".join("?" * len(timer_ids))
        sql = (
            "UPDATE timers SET state = 'firing', claimed_by = ?, epoch = ?, claimed_until_ms = ?,"
            f" claim_token = ?, attempts = attempts + 1 WHERE id IN ({marks})"
            f" AND state = 'pending' AND due_at_ms <= ? RETURNING {COLUMNS}"
        )
        params = (claim.owner, claim.epoch, claim.until_ms, claim.token, *timer_ids, claim.now_ms)
        rows = self._run(lambda c: c.execute(sql, params).fetchall())
        return [_to_timer(r) for r in rows]

    def complete(self, outcomes: Sequence[Outcome]) -> int:
        def work(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                params = [_complete_params(o) for o in outcomes]
                return conn.executemany(COMPLETE_SQL, params).rowcount  # the rows changed in all

        return self._run(work) if outcomes else 0

    def list_timers(
        self, state: State | None, before_id: str | None, limit: int, tenant: str | None = None
    ) -> list[Timer]:
        conditions = {"tenant = ?": tenant, "state = ?": state, "id < ?": before_id}
        given = {sql: value for sql, value in conditions.items() if value is not None}
        where = f"WHERE {' AND '.join(given)}" if given else ""
        sql = f"SELECT {COLUMNS} FROM timers {where} ORDER BY id DESC LIMIT ?"
        params = (*given.values(), max(limit, 0))
        return [_to_timer(r) for r in self._run(lambda c: c.execute(sql, params).fetchall())]

    def replay(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        values = {"state": "pending", "due_at_ms": now_ms, "attempts": 0}
        return self._update_in_state(timer_id, tenant, ("failed", "fired"), values)

    def release_claim(self, token: str) -> int:
        return self._run(lambda c: c.execute(RELEASE_CLAIM_SQL, (token,)).rowcount)

    def recover_expired(self, now_ms: int, limit: int, max_attempts: int) -> int:
        params = {"now": now_ms, "limit": limit, "max_attempts": max_attempts}
        return self._run(lambda c: c.execute(RECOVER_EXPIRED_SQL, params).rowcount)

    # lease

    def acquire_lease(self, holder: str, ttl_ms: int, now_ms: int) -> Lease | None:
        params = {"name": LEASE_NAME, "holder": holder, "expires": now_ms + ttl_ms, "now": now_ms}
        row = self._run(lambda c: c.execute(ACQUIRE_LEASE_SQL, params).fetchone())
        return None if row is None else Lease(holder=row[0], epoch=row[1], expires_at_ms=row[2])

    def release_lease(self, holder: str, epoch: int) -> bool:
        sql = (
            "UPDATE leases SET expires_at_ms = 0"
            " WHERE name = ? AND holder = ? AND epoch = ? AND expires_at_ms > 0"
        )
        return self._run(lambda c: c.execute(sql, (LEASE_NAME, holder, epoch)).rowcount) == 1

    def get_lease(self) -> Lease | None:
        sql = "SELECT holder, epoch, expires_at_ms FROM leases WHERE name = ?"
        row = self._run(lambda c: c.execute(sql, (LEASE_NAME,)).fetchone())
        return None if row is None else Lease(holder=row[0], epoch=row[1], expires_at_ms=row[2])

    # API keys

    def add_key(self, key: ApiKey) -> None:
        sql = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        params = (
            key.key_id,
            key.name,
            key.tenant,
            key.secret_hash,
            key.created_at_ms,
            key.revoked_at_ms,
        )
        self._run(lambda c: c.execute(sql, params))

    def get_key(self, key_id: str) -> ApiKey | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ?"
        row = self._run(lambda c: c.execute(sql, (key_id,)).fetchone())
        return None if row is None else ApiKey(*row)

    def list_keys(self) -> list[ApiKey]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms, key_id"
        return [ApiKey(*row) for row in self._run(lambda c: c.execute(sql).fetchall())]

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        sql = "UPDATE api_keys SET revoked_at_ms = ? WHERE key_id = ? AND revoked_at_ms IS NULL"
        return self._run(lambda c: c.execute(sql, (now_ms, key_id)).rowcount) == 1

    # lifecycle

    def server_time_ms(self) -> None:
        return None  # the file lives on this host: every process shares its clock

    def ping(self) -> None:
        self._run(lambda c: c.execute("SELECT 1 FROM timers LIMIT 1").fetchall())

    def close(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.stop()
                self._writer = None
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # reads for the console

    def count_by_state_of(self, tenant: str) -> dict[State, int]:
        sql = "SELECT state, count(*) FROM timers WHERE tenant = ? GROUP BY state"
        rows = self._run(lambda c: c.execute(sql, (tenant,)).fetchall())
        return {State(state): n for state, n in rows}

    def earliest_pending_of(self, tenant: str) -> Due | None:
        sql = (
            "SELECT id, due_at_ms, url FROM timers WHERE tenant = ? AND state = 'pending'"
            " ORDER BY due_at_ms, id LIMIT 1"
        )
        row = self._run(lambda c: c.execute(sql, (tenant,)).fetchone())
        return None if row is None else Due(id=row[0], due_at_ms=row[1], url=row[2])

    def list_timers_by_url(
        self,
        url_prefix: str,
        state: State | None,
        before_id: str | None,
        limit: int,
        *,
        tenant: str | None,
        scan: int,
    ) -> tuple[list[Timer], str | None]:
        if limit <= 0:
            return [], None
        state_value = None if state is None else state.value
        conditions = {"tenant = ?": tenant, "state = ?": state_value, "id < ?": before_id}
        given = {sql: value for sql, value in conditions.items() if value is not None}
        where = " AND ".join(["1", *given])
        edge_sql = f"SELECT id FROM timers WHERE {where} ORDER BY id DESC LIMIT 1 OFFSET ?"
        sql = (
            f"SELECT {COLUMNS} FROM timers WHERE {where} AND id >= ?"
            " AND substr(url, 1, ?) = ? ORDER BY id DESC LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> tuple[str | None, list[Any]]:
            edge = c.execute(edge_sql, (*given.values(), max(scan, 1) - 1)).fetchone()
            floor = "" if edge is None else edge[0]
            params = (*given.values(), floor, len(url_prefix), url_prefix, limit)
            return None if edge is None else edge[0], c.execute(sql, params).fetchall()

        edge_id, rows = self._run(work)
        timers = [_to_timer(r) for r in rows]
        return timers, timers[-1].id if len(timers) == limit else edge_id
