"""A fault-injecting `Store`: every call may fail the way the real driver fails.

Each view delegates to the real adapter. Per call, the view's RNG picks: no fault; fail before
applying; apply (for a batch, a random part of it) and then fail, as when the write landed but
its acknowledgement was lost; or, for inserts, a duplicate key. Every error is a real driver
exception raised *through the adapter's own translator*, so the mapping of driver errors to
`StoreUnavailable` is what is under test, not a stand-in for it.
"""

from __future__ import annotations

import contextlib
import enum
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mongomock.collection
import pymongo.errors

from timerd.models import ApiKey, Claim, Due, Lease, Outcome, State, Timer, TimerChanges
from timerd.store import mongo as mongo_adapter
from timerd.store import sqlite as sqlite_adapter
from timerd.store.base import Store

T = TypeVar("T")
ErrorFactory = Callable[[], BaseException]
Observer = Callable[[str, tuple[Any, ...], Any], None]


def _bulk_write_concern_error() -> BaseException:
    return pymongo.errors.BulkWriteError(
        {
            "writeErrors": [],
            "writeConcernErrors": [{"code": 64, "errmsg": "waiting for replication timed out"}],
            "nInserted": 0,
            "nUpserted": 0,
            "nMatched": 1,
            "nModified": 1,
            "nRemoved": 0,
            "upserted": [],
        }
    )


# What pymongo raises when a replica set is electing, unreachable or slow: all mean "try again".
MONGO_RETRYABLE: tuple[ErrorFactory, ...] = (
    lambda: pymongo.errors.AutoReconnect("connection closed"),
    lambda: pymongo.errors.NotPrimaryError("not primary", {"code": 10107, "errmsg": "not primary"}),
    lambda: pymongo.errors.NetworkTimeout("timed out"),
    lambda: pymongo.errors.ServerSelectionTimeoutError("No replica set members available"),
    lambda: pymongo.errors.WTimeoutError("waiting for replication timed out", 64, {}),
    lambda: pymongo.errors.WriteConcernError("waiting for replication timed out", 64, {}),
    lambda: pymongo.errors.ExecutionTimeout("operation exceeded time limit", 50, {}),
    _bulk_write_concern_error,
    lambda: pymongo.errors.OperationFailure("Primary stepped down", 189, {}),
    lambda: pymongo.errors.OperationFailure("Interrupted due to repl state change", 11602, {}),
)
# What sqlite3 raises when another process holds the write lock past busy_timeout, or the disk
# misbehaves for a moment.
SQLITE_RETRYABLE: tuple[ErrorFactory, ...] = (
    lambda: sqlite3.OperationalError("database is locked"),
    lambda: sqlite3.OperationalError("disk I/O error"),
)
MONGO_DEAD = lambda: pymongo.errors.AutoReconnect("connection refused")  # noqa: E731 - a factory
SQLITE_DEAD = lambda: sqlite3.OperationalError("unable to open database file")  # noqa: E731


def _mongo_duplicate() -> BaseException:
    return pymongo.errors.DuplicateKeyError("E11000 duplicate key error", 11000, {})


def _sqlite_duplicate() -> BaseException:
    return sqlite3.IntegrityError("UNIQUE constraint failed: timers.id")


def translator(kind: str) -> Callable[[], AbstractContextManager[None]]:
    """The adapter's one place where driver errors are translated."""
    module: Any = mongo_adapter if kind == "mongo" else sqlite_adapter
    for name in (
        "translate_errors",
        "_unavailable_on_connection_error",
        "_unavailable_on_operational_error",
    ):
        found = getattr(module, name, None)
        if found is not None:
            return found  # type: ignore[no-any-return]
    raise RuntimeError(f"the {kind} adapter has no error translator the simulator knows")


@dataclass(frozen=True, slots=True)
class DriverErrors:
    """The errors one backend's driver raises, as fresh instances on demand."""

    kind: str
    retryable: tuple[ErrorFactory, ...]
    dead: ErrorFactory
    duplicate: ErrorFactory

    @classmethod
    def of(cls, kind: str) -> DriverErrors:
        if kind == "mongo":
            return cls(kind, MONGO_RETRYABLE, MONGO_DEAD, _mongo_duplicate)
        return cls(kind, SQLITE_RETRYABLE, SQLITE_DEAD, _sqlite_duplicate)


class Fault(enum.Enum):
    NONE = "none"
    BEFORE = "fail-before"
    AFTER = "apply-then-fail"
    DUPLICATE = "duplicate-key"


@dataclass(slots=True)
class FaultPlan:
    """How often each fault strikes one call, while `on`."""

    p_before: float = 0.05
    p_after: float = 0.03
    p_duplicate: float = 0.05  # of inserts
    on: bool = True


@dataclass(slots=True)
class ViewStats:
    calls: int = 0
    faults: dict[str, int] = field(default_factory=dict)


WRITES = frozenset(
    {
        "insert",
        "cancel",
        "update_pending",
        "claim_due",
        "release_claim",
        "complete",
        "replay",
        "recover_expired",
        "purge_finished",
        "acquire_lease",
        "release_lease",
        "add_key",
        "revoke_key",
    }
)


class FaultyStore(Store):
    """One process's view of the shared store, with faults; `dead` once its process is killed."""

    def __init__(
        self,
        inner: Store,
        *,
        name: str,
        kind: str,
        rng: random.Random,
        plan: FaultPlan,
        server_time_ms: Callable[[], int],
        trace: Callable[[str], None],
        observer: Observer | None = None,
    ) -> None:
        self.inner = inner
        self.name = name
        self.kind = kind
        self.rng = rng
        self.plan = plan
        self.dead = False
        self.stats = ViewStats()
        self._errors = DriverErrors.of(kind)
        self._translate = translator(kind)
        self._true_ms = server_time_ms
        self._trace = trace
        self._observer = observer

    # the fault machinery

    def _draw(self, op: str) -> Fault:
        if not self.plan.on:
            return Fault.NONE
        r = self.rng.random()
        if r < self.plan.p_before:
            return Fault.BEFORE
        if op in WRITES and r < self.plan.p_before + self.plan.p_after:
            return Fault.AFTER
        if op == "insert" and self.rng.random() < self.plan.p_duplicate:
            return Fault.DUPLICATE
        return Fault.NONE

    def _fail(self, op: str, fault: str, exc: BaseException) -> None:
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
        self._trace(f"{self.name} {op}: {fault} {type(exc).__name__}")
        with self._translate():
            raise exc
        raise AssertionError(f"the {self.kind} translator swallowed {exc!r}")

    def _call(
        self,
        op: str,
        args: tuple[Any, ...],
        apply: Callable[[], T],
        partial: Callable[[], object] | None = None,
    ) -> T:
        self.stats.calls += 1
        if self.dead:
            self._fail(op, "dead", self._errors.dead())
        fault = self._draw(op)
        if fault is Fault.BEFORE:
            self._fail(op, fault.value, self.rng.choice(self._errors.retryable)())
        if fault is Fault.AFTER:
            landed = (partial or apply)()
            self._observe(op, args, landed)
            self._fail(op, fault.value, self.rng.choice(self._errors.retryable)())
        if fault is Fault.DUPLICATE:  # the driver retried a write that had landed after all
            landed = apply()
            self._observe(op, args, landed)
            self._fail(op, fault.value, self._errors.duplicate())
        result = apply()
        self._observe(op, args, result)
        return result

    def _observe(self, op: str, args: tuple[Any, ...], result: Any) -> None:
        if self._observer is not None:
            self._observer(op, args, result)

    def _subset(self, items: Sequence[T]) -> list[T]:
        """A random part of a batch, in its order: what landed before the connection broke."""
        keep = sorted(self.rng.sample(range(len(items)), self.rng.randint(0, len(items))))
        return [items[i] for i in keep]

    # the contract, delegated

    def insert(self, timer: Timer) -> Timer:
        return self._call("insert", (timer,), lambda: self.inner.insert(timer))

    def find_by_idempotency_key(self, tenant: str, key: str) -> Timer | None:
        args = (tenant, key)
        return self._call(
            "find_by_idempotency_key", args, lambda: self.inner.find_by_idempotency_key(*args)
        )

    def get(self, timer_id: str, tenant: str | None = None) -> Timer:
        return self._call("get", (timer_id,), lambda: self.inner.get(timer_id, tenant))

    def cancel(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        return self._call(
            "cancel", (timer_id, now_ms), lambda: self.inner.cancel(timer_id, now_ms, tenant)
        )

    def update_pending(
        self, timer_id: str, changes: TimerChanges, tenant: str | None = None
    ) -> Timer:
        return self._call(
            "update_pending",
            (timer_id, changes),
            lambda: self.inner.update_pending(timer_id, changes, tenant),
        )

    def count_pending(self, tenant: str, limit: int) -> int:
        args = (tenant, limit)
        return self._call("count_pending", args, lambda: self.inner.count_pending(*args))

    def pending_due(
        self, before_ms: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Due]:
        args = (before_ms, limit, after)
        return self._call("pending_due", args, lambda: self.inner.pending_due(*args))

    def next_due_at_ms(self) -> int | None:
        return self._call("next_due_at_ms", (), self.inner.next_due_at_ms)

    def count_by_state(self) -> dict[State, int]:
        return self._call("count_by_state", (), self.inner.count_by_state)

    def count_active(self) -> dict[State, int]:
        return self._call("count_active", (), self.inner.count_active)

    def claim_due(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        ids = list(timer_ids)
        return self._call(
            "claim_due",
            (ids, claim),
            lambda: self.inner.claim_due(ids, claim),
            lambda: self.inner.claim_due(self._subset(ids), claim),
        )

    def release_claim(self, token: str) -> int:
        return self._call("release_claim", (token,), lambda: self.inner.release_claim(token))

    def complete(self, outcomes: Sequence[Outcome]) -> int:
        batch = list(outcomes)
        return self._call(
            "complete",
            (batch,),
            lambda: self.inner.complete(batch),
            lambda: self.inner.complete(self._subset(batch)),
        )

    def list_timers(
        self, state: State | None, before_id: str | None, limit: int, tenant: str | None = None
    ) -> list[Timer]:
        args = (state, before_id, limit, tenant)
        return self._call("list_timers", args, lambda: self.inner.list_timers(*args))

    def replay(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        args = (timer_id, now_ms, tenant)
        return self._call("replay", args, lambda: self.inner.replay(*args))

    def recover_expired(self, now_ms: int, limit: int, max_attempts: int) -> int:
        args = (now_ms, limit, max_attempts)
        return self._call(
            "recover_expired",
            args,
            lambda: self.inner.recover_expired(*args),
            lambda: self.inner.recover_expired(now_ms, self.rng.randint(0, limit), max_attempts),
        )

    def purge_finished(self, before_ms: int, limit: int) -> int:
        args = (before_ms, limit)
        return self._call(
            "purge_finished",
            args,
            lambda: self.inner.purge_finished(*args),
            lambda: self.inner.purge_finished(before_ms, self.rng.randint(0, limit)),
        )

    def acquire_lease(self, holder: str, ttl_ms: int, now_ms: int) -> Lease | None:
        args = (holder, ttl_ms, now_ms)
        return self._call("acquire_lease", args, lambda: self.inner.acquire_lease(*args))

    def release_lease(self, holder: str, epoch: int) -> bool:
        args = (holder, epoch)
        return self._call("release_lease", args, lambda: self.inner.release_lease(*args))

    def get_lease(self) -> Lease | None:
        return self._call("get_lease", (), self.inner.get_lease)

    def add_key(self, key: ApiKey) -> None:
        return self._call("add_key", (key,), lambda: self.inner.add_key(key))

    def get_key(self, key_id: str) -> ApiKey | None:
        return self._call("get_key", (key_id,), lambda: self.inner.get_key(key_id))

    def list_keys(self) -> list[ApiKey]:
        return self._call("list_keys", (), self.inner.list_keys)

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        args = (key_id, now_ms)
        return self._call("revoke_key", args, lambda: self.inner.revoke_key(*args))

    def server_time_ms(self) -> int | None:
        """The true time of the simulated world, whichever backend: every host judges by it."""

        def read() -> int:
            stored = self.inner.server_time_ms()
            return self._true_ms() if stored is None else stored

        return self._call("server_time_ms", (), read)

    def ping(self) -> None:
        return self._call("ping", (), self.inner.ping)

    def close(self) -> None:
        pass  # the inner store is shared by every view; the world closes it once


@contextlib.contextmanager
def mongomock_bulk_without_sort() -> Iterator[None]:
    """pymongo >= 4.11 hands every bulk update a `sort`, which mongomock 4.3 does not accept
    (the same patch as tests/conftest.py's, for the length of one run)."""
    builder: Any = mongomock.collection.BulkOperationBuilder
    original = builder.add_update

    def add_update(self: object, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        assert sort is None
        return original(self, *args, **kwargs)

    builder.add_update = add_update
    try:
        yield
    finally:
        builder.add_update = original
