"""The embedded store: one SQLite file in WAL mode, for a single host.

The API's writes (creates, cancels, changes, replays) from many threads share commits through one
writer thread (group commit), so durable `synchronous=FULL` commits do not cap them at one fsync
each and they never race one another for SQLite's lock. Every other operation is a single
statement on a per-thread connection; SQLite serialises writers across processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import msgspec

from timerd.errors import StoreUnavailable, WouldBlock
from timerd.models import (
    HISTORY_MAX,
    ApiKey,
    CallbackOutcome,
    CallbackState,
    Claim,
    Due,
    Lease,
    Outcome,
    State,
    Timer,
    history_from_dicts,
    history_to_dicts,
    partition_of,
)
from timerd.store.base import CLAIM_EXPIRED
from timerd.store.rules import BaseStore, InState, TimerFilter, key_holder
from timerd.store.sqlite_schema import migrate, retry_locked, transaction, use_wal

T = TypeVar("T")

# The `timers` columns a Timer is made of: one per field, by name (`headers` and `history` are
# JSON text, `state` its string value).
TIMER_COLUMNS = tuple(f.name for f in dataclasses.fields(Timer))
COLUMNS = ", ".join(TIMER_COLUMNS)
# OR IGNORE: a second timer with a tenant's idempotency key is not inserted (see `insert`).
INSERT_SQL = (  # bound by position: a fifth cheaper than by name, for every create
    f"INSERT OR IGNORE INTO timers ({COLUMNS}, partition)"
    f" VALUES ({', '.join('?' * (len(TIMER_COLUMNS) + 1))})"
)
BY_IDEMPOTENCY_KEY_SQL = f"SELECT {COLUMNS} FROM timers WHERE tenant = ? AND idempotency_key = ?"

# INDEXED BY: the planner would otherwise take timers_state_id (state = ?) and sort.
PENDING_DUE_SQL = (
    "SELECT id, due_at_ms, url FROM timers INDEXED BY timers_pending_due"
    " WHERE state = 'pending' AND due_at_ms < ? {after} {partitions}"
    " ORDER BY due_at_ms, id LIMIT ?"
)
NEXT_DUE_SQL = (
    "SELECT MIN(due_at_ms) FROM timers INDEXED BY timers_pending_due WHERE state = 'pending'"
)

COUNT_PENDING_SQL = (
    "SELECT count(*) FROM timers INDEXED BY timers_pending_due WHERE state = 'pending'"
)
COUNT_FIRING_SQL = (
    "SELECT count(*) FROM timers INDEXED BY timers_firing_claim WHERE state = 'firing'"
)
PURGE_FINISHED_SQL = (
    "DELETE FROM timers WHERE id IN (SELECT id FROM timers INDEXED BY timers_finished"
    " WHERE finished_at_ms < ? AND callback_state IS NOT 'pending'"
    " AND callback_state IS NOT 'firing' LIMIT ?)"
)

LEASE_COLUMNS = "name, holder, epoch, expires_at_ms"
ACQUIRE_LEASE_SQL = f"""
INSERT INTO leases (name, holder, epoch, expires_at_ms) VALUES (:name, :holder, 1, :expires)
ON CONFLICT (name) DO UPDATE SET
    epoch = CASE WHEN holder = excluded.holder THEN epoch ELSE epoch + 1 END,
    holder = excluded.holder,
    expires_at_ms = excluded.expires_at_ms
WHERE holder = excluded.holder OR expires_at_ms < :now
RETURNING {LEASE_COLUMNS}
"""

# The history grows by one entry per attempt and drops its oldest past HISTORY_MAX; the first
# entry is written without parsing any JSON.
_APPEND_HISTORY = f"""CASE WHEN history IS NULL THEN '[' || {{record}} || ']' ELSE (
    SELECT CASE WHEN json_array_length(h) > {HISTORY_MAX} THEN json_remove(h, '$[0]') ELSE h END
    FROM (SELECT json_insert(history, '$[#]', json({{record}})) AS h)
) END"""
_EXPIRED_RECORD = (
    "json_object('attempt', attempts, 'at_ms', :now, 'latency_ms', 0, 'status', NULL,"
    f" 'error', '{CLAIM_EXPIRED}', 'response', NULL)"
)
# A failure makes the row's callback pending, due at once, in the same write (a newer failure
# of a series supersedes a callback still undelivered: its claim, if any, no longer applies).
_NEW_CALLBACK = """callback_state = CASE WHEN {when} THEN 'pending' ELSE callback_state END,
    callback_due_at_ms = CASE WHEN {when} THEN {at} ELSE callback_due_at_ms END,
    callback_attempts = CASE WHEN {when} THEN 0 ELSE callback_attempts END,
    callback_token = CASE WHEN {when} THEN NULL ELSE callback_token END,
    callback_until_ms = CASE WHEN {when} THEN NULL ELSE callback_until_ms END,
    callback_status = CASE WHEN {when} THEN NULL ELSE callback_status END,
    callback_error = CASE WHEN {when} THEN NULL ELSE callback_error END,
    callback_occurrence = CASE WHEN {when} THEN {occurrence} ELSE callback_occurrence END"""
COMPLETE_SQL = f"""
UPDATE timers SET state = :state, fired_at_ms = COALESCE(:fired_at_ms, fired_at_ms),
    fired_by = CASE WHEN :fired_at_ms IS NOT NULL THEN :owner ELSE fired_by END,
    finished_at_ms = CASE WHEN :state = 'pending' THEN NULL ELSE :at_ms END,
    due_at_ms = COALESCE(:next_due_at_ms, due_at_ms),
    occurrence = COALESCE(:next_occurrence, occurrence),
    occurrence_at_ms = CASE WHEN :next_occurrence IS NULL THEN occurrence_at_ms
        ELSE :next_due_at_ms END,
    attempts = CASE WHEN :next_occurrence IS NULL THEN attempts ELSE 0 END,
    occurrences_failed = occurrences_failed + :occurrence_failed, last_status = :status,
    last_error = :error, claimed_by = NULL, claimed_until_ms = NULL, claim_token = NULL,
    history = CASE WHEN :record IS NULL THEN history
        ELSE {_APPEND_HISTORY.format(record=":record")} END,
    {
    _NEW_CALLBACK.format(
        when=":callback_occurrence IS NOT NULL", at=":at_ms", occurrence=":callback_occurrence"
    )
}
WHERE id = :id AND state = 'firing' AND claim_token = :token
"""

# The outcome of most deliveries (delivered, and no series goes on): `COMPLETE_SQL` reduced to
# what it changes then, bound by position, in two thirds of the time.
COMPLETE_FIRED_SQL = f"""
UPDATE timers SET state = 'fired', fired_at_ms = ?1, fired_by = ?2, finished_at_ms = ?1,
    last_status = ?3, last_error = ?4, claimed_by = NULL, claimed_until_ms = NULL,
    claim_token = NULL, history = {_APPEND_HISTORY.format(record="?5")}
WHERE id = ?6 AND state = 'firing' AND claim_token = ?7
"""

RELEASE_CLAIM_SQL = """
UPDATE timers SET state = 'pending', attempts = attempts - 1, claimed_by = NULL,
    claimed_until_ms = NULL, claim_token = NULL
WHERE claim_token = ? AND state = 'firing'
"""

# An expired claim counts as a failed attempt: failed once the budget is spent, else pending
# (a series always: the daemon's next attempt moves it on).
_SPENT = "attempts >= COALESCE(max_attempts, :max_attempts) AND schedule IS NULL"
RECOVER_EXPIRED_SQL = f"""
UPDATE timers SET
    state = CASE WHEN {_SPENT} THEN 'failed' ELSE 'pending' END,
    finished_at_ms = CASE WHEN {_SPENT} THEN :now ELSE NULL END,
    claimed_by = NULL, claimed_until_ms = NULL, claim_token = NULL,
    last_status = NULL, last_error = '{CLAIM_EXPIRED}',
    history = {_APPEND_HISTORY.format(record=_EXPIRED_RECORD)},
    {
    _NEW_CALLBACK.format(when=f"{_SPENT} AND on_failure_url IS NOT NULL", at=":now", occurrence="0")
}
WHERE id IN (
    SELECT id FROM timers INDEXED BY timers_firing_claim
    WHERE state = 'firing' AND claimed_until_ms < :now {{partitions}} LIMIT :limit
)
"""

CALLBACKS_DUE_SQL = (
    "SELECT id, callback_due_at_ms, on_failure_url FROM timers INDEXED BY timers_callbacks_due"
    " WHERE callback_state = 'pending' AND callback_due_at_ms < :before {partitions}"
    " ORDER BY callback_due_at_ms LIMIT :limit"
)
CLAIM_CALLBACKS_SQL = f"""
UPDATE timers SET callback_state = 'firing', callback_token = :token,
    callback_until_ms = :until, callback_attempts = callback_attempts + 1
WHERE id IN ({{ids}}) AND callback_state = 'pending' AND callback_due_at_ms <= :now
RETURNING {COLUMNS}
"""
COMPLETE_CALLBACK_SQL = """
UPDATE timers SET callback_state = :state, callback_token = NULL, callback_until_ms = NULL,
    callback_due_at_ms = CASE WHEN :state = 'pending' THEN :next_due_at_ms ELSE NULL END,
    callback_status = :status, callback_error = :error
WHERE id = :id AND callback_state = 'firing' AND callback_token = :token
"""
RECOVER_CALLBACKS_SQL = f"""
UPDATE timers SET callback_state = 'pending', callback_token = NULL, callback_until_ms = NULL,
    callback_status = NULL, callback_error = '{CLAIM_EXPIRED}'
WHERE id IN (
    SELECT id FROM timers INDEXED BY timers_callbacks_firing
    WHERE callback_state = 'firing' AND callback_until_ms < :now {{partitions}} LIMIT :limit
)
"""

KEY_FIELDS = tuple(f.name for f in dataclasses.fields(ApiKey))  # the `api_keys` columns
KEY_COLUMNS = ", ".join(KEY_FIELDS)

_GROUP_COMMIT_MAX = 1000


def _to_timer(row: sqlite3.Row) -> Timer:
    """The timer of a row selected as `COLUMNS`, built by position (in that order: five times
    faster than by name, and this runs for every claimed timer)."""
    values = list(row)
    values[_STATE] = State(values[_STATE])
    if values[_CALLBACK_STATE] is not None:
        values[_CALLBACK_STATE] = CallbackState(values[_CALLBACK_STATE])
    headers, history = values[_HEADERS], values[_HISTORY]
    values[_HEADERS] = () if headers is None else tuple((k, v) for k, v in json.loads(headers))
    values[_HISTORY] = () if history is None else history_from_dicts(json.loads(history))
    return Timer(*values)


_STATE, _CALLBACK_STATE, _HEADERS, _HISTORY = (
    TIMER_COLUMNS.index(name) for name in ("state", "callback_state", "headers", "history")
)


def _encode(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values of Timer fields (given as a Timer holds them): `state` and
    `callback_state` as their strings, `headers` and `history` as JSON text (NULL when empty)."""
    columns = dict(values)
    for name, encode in _ENCODERS.items():
        if name in columns:
            columns[name] = encode(columns[name])
    return columns


_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "state": lambda state: state.value,
    "callback_state": lambda state: None if state is None else state.value,
    "headers": lambda headers: json.dumps(headers) if headers else None,
    "history": lambda history: json.dumps(history_to_dicts(history)) if history else None,
}


def _insert_params(t: Timer, partitions: int) -> tuple[Any, ...]:
    """The values of `INSERT_SQL`: the columns in `TIMER_COLUMNS` order, then the partition."""
    values = _encode({name: getattr(t, name) for name in TIMER_COLUMNS})
    return (*values.values(), partition_of(t.id, partitions))


def _to_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(**{name: row[name] for name in KEY_FIELDS})


def _to_lease(row: sqlite3.Row) -> Lease:
    return Lease(row["name"], row["holder"], row["epoch"], row["expires_at_ms"])


def _in(column: str, values: Sequence[Any] | None) -> tuple[str, tuple[Any, ...]]:
    """`AND column IN (?, …)` and its parameters; nothing when `values` is None."""
    if values is None:
        return "", ()
    return f"AND {column} IN ({', '.join('?' * len(values))})", tuple(values)


_RECORD_JSON = msgspec.json.Encoder()  # five times json.dumps's speed; one record per delivery


def _complete_params(o: Outcome) -> dict[str, Any]:
    return {
        "id": o.timer_id,
        "token": o.claim_token,
        "state": o.state.value,
        "fired_at_ms": o.at_ms if o.delivered else None,
        "next_occurrence": o.next_occurrence if o.state is State.PENDING else None,
        "occurrence_failed": int(o.occurrence_failed),
        "at_ms": o.at_ms,
        "owner": o.owner,
        "next_due_at_ms": o.next_due_at_ms if o.state is State.PENDING else None,
        "status": o.status,
        "error": o.error,
        "record": None if o.record is None else _RECORD_JSON.encode(o.record.as_dict()).decode(),
        "callback_occurrence": o.callback_occurrence,
    }


def _is_fired(o: Outcome) -> bool:
    """Whether `COMPLETE_FIRED_SQL` writes this outcome (as `COMPLETE_SQL` would)."""
    return o.state is State.FIRED and o.record is not None and o.callback_occurrence is None


def _fired_params(o: Outcome) -> tuple[Any, ...]:
    assert o.record is not None
    record = _RECORD_JSON.encode(o.record.as_dict()).decode()
    return (o.at_ms, o.owner, o.status, o.error, record, o.timer_id, o.claim_token)


def _where(where: TimerFilter) -> tuple[str, tuple[Any, ...]]:
    """The SQL conditions of a listing's filter ("1" when it has none) and their parameters."""
    given = {
        "tenant = ?": where.tenant,
        "state = ?": None if where.state is None else where.state.value,
        "id < ?": where.before_id,
    }
    clauses = {sql: value for sql, value in given.items() if value is not None}
    conditions = list(clauses)
    if where.recurring is not None:
        conditions.append(f"schedule IS {'NOT ' if where.recurring else ''}NULL")
    return " AND ".join(conditions) or "1", tuple(clauses.values())


def _in_named(partitions: Sequence[int] | None) -> tuple[str, dict[str, int]]:
    """`AND partition IN (:p0, …)` and its parameters; nothing when `partitions` is None."""
    named = {f"p{i}": p for i, p in enumerate(partitions or ())}
    return ("" if partitions is None else f"AND partition IN (:{', :'.join(named)})"), named


@contextmanager
def translate_errors() -> Iterator[None]:
    """The one place SQLite errors that mean "try again" become `StoreUnavailable`."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, unreadable file, disk full
        raise StoreUnavailable(f"sqlite: {exc}") from exc


def _insert_one(conn: sqlite3.Connection, timer: Timer, partitions: int) -> Timer:
    """Insert, or return the tenant's timer that already has this idempotency key."""
    if conn.execute(INSERT_SQL, _insert_params(timer, partitions)).rowcount == 1:
        return timer

    def find(tenant: str, key: str) -> Timer | None:
        row = conn.execute(BY_IDEMPOTENCY_KEY_SQL, (tenant, key)).fetchone()
        return None if row is None else _to_timer(row)

    existing = key_holder(timer, find)  # read in this transaction: it may hold the other
    if existing is None:  # not an idempotency clash: the id itself exists, which cannot happen
        raise sqlite3.IntegrityError(f"timer {timer.id} exists")
    return existing


Work = Callable[[sqlite3.Connection], Any]
Settle = Callable[[Any, BaseException | None], None]  # hears (result, None) or (None, error)
_Pending = tuple[Work, Settle]


def _settle(
    future: asyncio.Future[Any] | concurrent.futures.Future[Any],
    value: Any,
    error: BaseException | None,
) -> None:
    if future.cancelled():  # the request went away meanwhile; the write stands
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


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
        self._queue.put((work, functools.partial(_settle, future)))
        return future

    def submit_async(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """`submit`, resolving a future of the running event loop (through
        `call_soon_threadsafe`): no thread waits, and no `concurrent.futures.Future` (with its
        condition variable) is made and chained for each create."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, value, error)

        self._queue.put((work, settle))
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
            with translate_errors(), transaction(conn):
                for work, _ in batch:
                    try:
                        outcomes.append((True, work(conn)))
                    except sqlite3.DatabaseError as exc:  # that statement alone was undone
                        outcomes.append((False, exc))
        except Exception as exc:  # every waiter must hear about the failure, whatever it was
            for _, settle in batch:
                settle(None, exc)
            return
        for (_, settle), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                settle(value, None)
            else:
                settle(None, value)


class _Nonblocking:
    """The context of `SqliteStore.nonblocking`: marks the calls of the thread that enters it."""

    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.nonblocking = True

    def __exit__(self, *_: object) -> None:
        self._local.nonblocking = False


class SqliteStore(BaseStore):
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
        self._write_lock = threading.Lock()  # see _run_write
        self._write_conn: sqlite3.Connection | None = None
        with translate_errors():
            conn = self._conn()
            use_wal(conn, busy_timeout_ms / 1000)
            migrate(conn)
            self._partitions: int = conn.execute(
                "SELECT value FROM meta WHERE name = 'partitions'"
            ).fetchone()[0]

    # connections

    def _connect(self, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
        if busy_timeout_ms is None:
            busy_timeout_ms = self._busy_timeout_ms
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
            check_same_thread=False,
            timeout=busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.row_factory = sqlite3.Row
        return conn

    def _connect_kept(self, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
        """`_connect`, kept in the list of connections that `close` closes."""
        conn = self._connect(busy_timeout_ms)
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect_kept()
        return conn

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._local.__dict__.get("nonblocking"):
            return self._run_now(work)
        with translate_errors():
            return work(self._conn())

    def _run_write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`_run` for a write outside the group commit (a daemon's claims, outcomes, sweeps and
        leases). This process's writers take turns on a lock and one connection, and a write
        the file's lock refuses (another process writes) is retried within the busy timeout
        by `retry_locked`, whose waits are far shorter than SQLite's busy handler's (which
        doubled a daemon's claim time in a burst). Retrying is safe: a write refused the lock
        changed nothing (`complete` begins IMMEDIATE)."""
        if self._local.__dict__.get("nonblocking"):
            if not self._write_lock.acquire(blocking=False):
                raise WouldBlock("another thread of this process is writing")
            try:
                return self._run_now(work)
            finally:
                self._write_lock.release()
        with self._write_lock, translate_errors():
            if self._write_conn is None:
                self._write_conn = self._connect_kept(busy_timeout_ms=0)
            conn = self._write_conn
            return retry_locked(lambda: work(conn), self._busy_timeout_ms / 1000)

    def _group_committer(self) -> _GroupCommitter:
        with self._writer_lock:
            if self._writer is None:
                self._writer = _GroupCommitter(self._connect)
            return self._writer

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in the writer thread's next transaction and wait for its commit."""
        future = self._group_committer().submit(work)
        with translate_errors():
            return future.result()

    def nonblocking(self) -> AbstractContextManager[None] | None:
        """Calls on this thread use a connection of its own that never waits for SQLite's
        lock and never checkpoints (`checkpoint` does, elsewhere). A commit that waits for the
        disk (synchronous FULL or EXTRA) cannot be made without waiting: None then."""
        if self._synchronous not in ("OFF", "NORMAL"):
            return None
        return _Nonblocking(self._local)

    def _run_now(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = self._local.__dict__.get("nonblocking_conn")
        if conn is None:
            conn = self._local.nonblocking_conn = self._connect_kept(busy_timeout_ms=0)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        with translate_errors():  # what is not the lock becomes StoreUnavailable there
            try:
                return work(conn)
            except sqlite3.OperationalError as exc:
                if "database is locked" not in str(exc):
                    raise
                raise WouldBlock(f"sqlite: {exc}") from exc

    def checkpoint(self) -> None:
        self._run(lambda c: c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    def partitions(self) -> int:
        return self._partitions

    @property
    def path(self) -> str:
        """The SQLite file this store opened."""
        return self._path

    def synchronous_level(self) -> int:
        """SQLite's `synchronous` level on this store's connections: 1 NORMAL, 2 FULL, 3 EXTRA."""
        level: int = self._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        return level

    def insert(self, timer: Timer) -> Timer:
        return self._write(lambda conn: _insert_one(conn, timer, self._partitions))

    def insert_many(self, timers: Sequence[Timer]) -> list[Timer]:
        return self._write(lambda conn: [_insert_one(conn, t, self._partitions) for t in timers])

    async def insert_many_async(self, timers: Sequence[Timer]) -> list[Timer]:
        """`insert_many` awaited on the event loop: the writer thread's commit resolves an
        asyncio future (see `_GroupCommitter.submit_async`), so no worker thread waits for it."""
        batch = list(timers)
        work = self._group_committer().submit_async(
            lambda conn: [_insert_one(conn, t, self._partitions) for t in batch]
        )
        with translate_errors():
            return await work

    def find_by_idempotency_key(self, tenant: str, key: str) -> Timer | None:
        row = self._run(lambda c: c.execute(BY_IDEMPOTENCY_KEY_SQL, (tenant, key)).fetchone())
        return None if row is None else _to_timer(row)

    def _find(self, timer_id: str) -> Timer | None:
        sql = f"SELECT {COLUMNS} FROM timers WHERE id = ?"
        row = self._run(lambda c: c.execute(sql, (timer_id,)).fetchone())
        return None if row is None else _to_timer(row)

    def _update_if(
        self, timer_id: str, tenant: str | None, when: InState, values: Mapping[str, Any]
    ) -> Timer | None:
        columns = _encode(values)
        assignments = ", ".join(f"{name} = ?" for name in columns) or "id = id"
        states, series_states = when.states, when.series_states
        sql = (
            f"UPDATE timers SET {assignments} WHERE id = ?"
            f" AND (state IN ({', '.join('?' * len(states))})"
            f" OR (schedule IS NOT NULL AND state IN ({', '.join('?' * len(series_states))})))"
            f" AND (? IS NULL OR tenant = ?) RETURNING {COLUMNS}"
        )
        params = (*columns.values(), timer_id, *states, *series_states, tenant, tenant)
        row = self._write(lambda c: c.execute(sql, params).fetchone())
        return None if row is None else _to_timer(row)

    def count_pending(self, tenant: str, limit: int) -> int:
        sql = (
            "SELECT count(*) FROM (SELECT 1 FROM timers INDEXED BY timers_tenant_state_id"
            " WHERE tenant = ? AND state = 'pending' LIMIT ?)"
        )
        count: int = self._run(lambda c: c.execute(sql, (tenant, limit)).fetchone()[0])
        return count

    def pending_due(
        self,
        before_ms: int,
        limit: int,
        after: tuple[int, str] | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[Due]:
        if partitions is not None and not partitions:
            return []
        in_partitions, partition_params = _in("partition", partitions)
        after_sql = "" if after is None else "AND (due_at_ms, id) > (?, ?)"
        sql = PENDING_DUE_SQL.format(after=after_sql, partitions=in_partitions)
        params = (before_ms, *(after or ()), *partition_params, limit)
        rows = self._run(lambda c: c.execute(sql, params).fetchall())
        return [Due(id=r["id"], due_at_ms=r["due_at_ms"], url=r["url"]) for r in rows]

    def next_due_at_ms(self) -> int | None:
        row = self._run(lambda c: c.execute(NEXT_DUE_SQL).fetchone())
        return None if row is None else row[0]

    def count_by_state(self) -> dict[State, int]:
        sql = "SELECT state, count(*) FROM timers GROUP BY state"
        return {State(state): n for state, n in self._run(lambda c: c.execute(sql).fetchall())}

    def count_series(self) -> int:
        sql = (
            "SELECT count(*) FROM timers INDEXED BY timers_tenant_series"
            " WHERE schedule IS NOT NULL AND state IN ('pending', 'firing', 'paused')"
        )
        count: int = self._run(lambda c: c.execute(sql).fetchone()[0])
        return count

    def count_active(self) -> dict[State, int]:
        pending = self._run(lambda c: c.execute(COUNT_PENDING_SQL).fetchone()[0])
        firing = self._run(lambda c: c.execute(COUNT_FIRING_SQL).fetchone()[0])
        return {State.PENDING: pending, State.FIRING: firing}

    def claim_due(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        if not timer_ids:
            return []
        marks = ", ".join("?" * len(timer_ids))
        sql = (
            "UPDATE timers SET state = 'firing', claimed_by = ?, claimed_until_ms = ?,"
            f" claim_token = ?, attempts = attempts + 1 WHERE id IN ({marks})"
            f" AND state = 'pending' AND due_at_ms <= ? RETURNING {COLUMNS}"
        )
        params = (claim.owner, claim.until_ms, claim.token, *timer_ids, claim.now_ms)
        rows = self._run_write(lambda c: c.execute(sql, params).fetchall())
        return [_to_timer(r) for r in rows]

    def complete(self, outcomes: Sequence[Outcome]) -> int:
        fired: list[tuple[Any, ...]] = []
        others: list[dict[str, Any]] = []
        for o in outcomes:  # each outcome judged once: this runs for every delivery
            if _is_fired(o):
                fired.append(_fired_params(o))
            else:
                others.append(_complete_params(o))

        def work(conn: sqlite3.Connection) -> int:
            with transaction(conn):  # rowcount: the rows changed in all
                changed = conn.executemany(COMPLETE_FIRED_SQL, fired).rowcount if fired else 0
                return changed + (conn.executemany(COMPLETE_SQL, others).rowcount if others else 0)

        return self._run_write(work) if outcomes else 0

    def _list(self, where: TimerFilter, limit: int) -> list[Timer]:
        conditions, params = _where(where)
        series_of_tenant = where.recurring and where.tenant is not None
        indexed = "INDEXED BY timers_tenant_series" if series_of_tenant else ""
        sql = f"SELECT {COLUMNS} FROM timers {indexed} WHERE {conditions} ORDER BY id DESC LIMIT ?"
        rows = self._run(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [_to_timer(r) for r in rows]

    def release_claim(self, token: str) -> int:
        return self._run_write(lambda c: c.execute(RELEASE_CLAIM_SQL, (token,)).rowcount)

    def recover_expired(
        self, now_ms: int, limit: int, max_attempts: int, partitions: Sequence[int] | None = None
    ) -> int:
        if partitions is not None and not partitions:
            return 0
        named = {f"p{i}": p for i, p in enumerate(partitions or ())}
        in_partitions = "" if partitions is None else f"AND partition IN (:{', :'.join(named)})"
        sql = RECOVER_EXPIRED_SQL.replace("{partitions}", in_partitions)
        params = {"now": now_ms, "limit": limit, "max_attempts": max_attempts} | named
        return self._run_write(lambda c: c.execute(sql, params).rowcount)

    # failure callbacks

    def callbacks_due(
        self, before_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> list[Due]:
        if partitions is not None and not partitions:
            return []
        where, named = _in_named(partitions)
        sql = CALLBACKS_DUE_SQL.replace("{partitions}", where)
        params = {"before": before_ms, "limit": limit} | named
        rows = self._run_write(lambda c: c.execute(sql, params).fetchall())
        return [Due(r["id"], r["callback_due_at_ms"], r["on_failure_url"]) for r in rows]

    def claim_callbacks(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        if not timer_ids:
            return []
        named = {f"i{n}": timer_id for n, timer_id in enumerate(timer_ids)}
        sql = CLAIM_CALLBACKS_SQL.replace("{ids}", ", ".join(f":{name}" for name in named))
        params = {"token": claim.token, "until": claim.until_ms, "now": claim.now_ms} | named
        return [_to_timer(r) for r in self._run_write(lambda c: c.execute(sql, params).fetchall())]

    def complete_callbacks(self, outcomes: Sequence[CallbackOutcome]) -> int:
        params = [
            {
                "id": o.timer_id,
                "token": o.claim_token,
                "state": o.state.value,
                "next_due_at_ms": o.next_due_at_ms,
                "status": o.status,
                "error": o.error,
            }
            for o in outcomes
        ]

        def work(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.executemany(COMPLETE_CALLBACK_SQL, params).rowcount

        return self._run_write(work) if outcomes else 0

    def recover_expired_callbacks(
        self, now_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> int:
        if partitions is not None and not partitions:
            return 0
        where, named = _in_named(partitions)
        sql = RECOVER_CALLBACKS_SQL.replace("{partitions}", where)
        params = {"now": now_ms, "limit": limit} | named
        return self._run_write(lambda c: c.execute(sql, params).rowcount)

    def purge_finished(self, before_ms: int, limit: int) -> int:
        return self._run_write(lambda c: c.execute(PURGE_FINISHED_SQL, (before_ms, limit)).rowcount)

    # leases

    def acquire_lease(self, name: str, holder: str, ttl_ms: int, now_ms: int) -> Lease | None:
        params = {"name": name, "holder": holder, "expires": now_ms + ttl_ms, "now": now_ms}
        row = self._run_write(lambda c: c.execute(ACQUIRE_LEASE_SQL, params).fetchone())
        return None if row is None else _to_lease(row)

    def renew_leases(
        self, holder: str, names: Sequence[str], ttl_ms: int, now_ms: int
    ) -> list[str]:
        if not names:
            return []
        in_names, name_params = _in("name", names)
        sql = f"UPDATE leases SET expires_at_ms = ? WHERE holder = ? {in_names} RETURNING name"
        params = (now_ms + ttl_ms, holder, *name_params)
        return [row["name"] for row in self._run_write(lambda c: c.execute(sql, params).fetchall())]

    def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        sql = (
            "UPDATE leases SET expires_at_ms = 0"
            " WHERE name = ? AND holder = ? AND epoch = ? AND expires_at_ms > 0"
        )
        return self._run_write(lambda c: c.execute(sql, (name, holder, epoch)).rowcount) == 1

    def get_lease(self, name: str) -> Lease | None:
        sql = f"SELECT {LEASE_COLUMNS} FROM leases WHERE name = ?"
        row = self._run(lambda c: c.execute(sql, (name,)).fetchone())
        return None if row is None else _to_lease(row)

    def leases(self) -> list[Lease]:
        sql = f"SELECT {LEASE_COLUMNS} FROM leases ORDER BY name"
        return [_to_lease(row) for row in self._run(lambda c: c.execute(sql).fetchall())]

    def delete_leases(self, prefix: str, expired_before_ms: int) -> int:
        sql = "DELETE FROM leases WHERE substr(name, 1, ?) = ? AND expires_at_ms < ?"
        params = (len(prefix), prefix, expired_before_ms)
        return self._run_write(lambda c: c.execute(sql, params).rowcount)

    # API keys

    def add_key(self, key: ApiKey) -> None:
        marks = ", ".join(f":{name}" for name in KEY_FIELDS)
        sql = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({marks})"
        params = dataclasses.asdict(key)
        self._run_write(lambda c: c.execute(sql, params))

    def get_key(self, key_id: str) -> ApiKey | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ?"
        row = self._run(lambda c: c.execute(sql, (key_id,)).fetchone())
        return None if row is None else _to_key(row)

    def list_keys(self) -> list[ApiKey]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms, key_id"
        return [_to_key(row) for row in self._run(lambda c: c.execute(sql).fetchall())]

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        sql = "UPDATE api_keys SET revoked_at_ms = ? WHERE key_id = ? AND revoked_at_ms IS NULL"
        return self._run_write(lambda c: c.execute(sql, (now_ms, key_id)).rowcount) == 1

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

    def count_by_state_of(self, tenant: str, limit: int) -> dict[State, int]:
        sql = (
            "SELECT count(*) FROM (SELECT 1 FROM timers INDEXED BY timers_tenant_state_id"
            " WHERE tenant = ? AND state = ? LIMIT ?)"
        )

        def count(conn: sqlite3.Connection) -> dict[State, int]:
            return {s: conn.execute(sql, (tenant, s.value, limit)).fetchone()[0] for s in State}

        return self._run(count)

    def earliest_pending_of(self, tenant: str) -> Due | None:
        sql = (
            "SELECT id, due_at_ms, url FROM timers WHERE tenant = ? AND state = 'pending'"
            " ORDER BY due_at_ms, id LIMIT 1"
        )
        row = self._run(lambda c: c.execute(sql, (tenant,)).fetchone())
        return None if row is None else Due(row["id"], row["due_at_ms"], row["url"])

    def _scan_by_url(
        self, url_prefix: str, where: TimerFilter, limit: int, scan: int
    ) -> tuple[list[Timer], str | None]:
        conditions, params = _where(where)
        edge_sql = f"SELECT id FROM timers WHERE {conditions} ORDER BY id DESC LIMIT 1 OFFSET ?"
        sql = (
            f"SELECT {COLUMNS} FROM timers WHERE {conditions} AND id >= ?"
            " AND substr(url, 1, ?) = ? ORDER BY id DESC LIMIT ?"
        )

        def work(c: sqlite3.Connection) -> tuple[str | None, list[Any]]:
            edge = c.execute(edge_sql, (*params, scan - 1)).fetchone()
            floor = "" if edge is None else edge[0]
            rows = c.execute(sql, (*params, floor, len(url_prefix), url_prefix, limit)).fetchall()
            return None if edge is None else edge[0], rows

        edge_id, rows = self._run(work)
        return [_to_timer(r) for r in rows], edge_id
