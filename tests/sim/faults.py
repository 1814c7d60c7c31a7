"""A fault-injecting `Store`: every call may fail the way the real driver fails.

Each view delegates to the real adapter. Per call, the view's RNG picks: no fault; fail before
applying; apply (for a batch, a random part of it) and then fail, as when the write landed but
its acknowledgement was lost; or, for inserts, a duplicate key. Every error is a real driver
exception raised *through the adapter's own translator*, so the mapping of driver errors to
`StoreUnavailable` is what is under test, not a stand-in for it.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import inspect
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mongomock.collection
import pymongo.errors

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


class StallFirst(Exception):
    """Raised by a view, before applying anything, to have its process stall first."""


@dataclass(slots=True)
class StallRequest:
    """Stop the process around its next call of `op` ("*": any), before or after applying."""

    op: str
    where: str  # "before" or "after"
    duration_s: float


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


INSERTS = frozenset({"insert", "insert_many"})
WRITES = frozenset(
    {
        "insert",
        "insert_many",
        "renew_leases",
        "delete_leases",
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


# What the adapters answer from memory, without I/O: never faulted.
IN_MEMORY = frozenset({"partitions"})

# The batch argument of each batch write: a fault may apply only part of it (a random subset of
# a sequence, or a smaller limit), as MongoDB applies a batch document by document.
PARTIAL_ARGUMENT = {
    "claim_due": "timer_ids",
    "complete": "outcomes",
    "insert_many": "timers",
    "renew_leases": "names",
    "recover_expired": "limit",
    "purge_finished": "limit",
}


class FaultyStore(Store):
    """One process's view of the shared store, with faults; `dead` once its process is killed.

    Every abstract method of `Store` is delegated (generated below the class, so a method the
    contract gains is faulted too without a change here) except the few defined here.
    """

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
        self.stall: StallRequest | None = None  # armed by the chaos, taken by `_call`
        self.stall_after: StallRequest | None = None  # taken: the offload stalls after the call
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
        if op in INSERTS and self.rng.random() < self.plan.p_duplicate:
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
        method: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Call `method` (the inner store's `op`), or fail the way the driver would."""
        kwargs = kwargs or {}
        self.stats.calls += 1
        if op in IN_MEMORY:
            return method(*args, **kwargs)
        if self.dead:
            self._fail(op, "dead", self._errors.dead())
        if self.stall is not None and self.stall.op in {op, "*"}:
            request, self.stall = self.stall, None
            if request.where == "before":  # stopped between deciding to write and writing
                self.stall_after = None
                raise StallFirst(request)
            self.stall_after = request  # the write lands; its answer waits for the process
        fault = self._draw(op)
        if fault is Fault.BEFORE:
            self._fail(op, fault.value, self.rng.choice(self._errors.retryable)())
        if fault is Fault.AFTER:
            landed = self._apply_part(op, method, args, kwargs)
            self._observe(op, args, landed)
            self._fail(op, fault.value, self.rng.choice(self._errors.retryable)())
        if fault is Fault.DUPLICATE:  # the driver retried a write that had landed after all
            landed = method(*args, **kwargs)
            self._observe(op, args, landed)
            self._fail(op, fault.value, self._errors.duplicate())
        result = method(*args, **kwargs)
        self._observe(op, args, result)
        return result

    def _apply_part(
        self, op: str, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Apply all of the call, or for a batch write a random part of it."""
        name = PARTIAL_ARGUMENT.get(op)
        if name is None:
            return method(*args, **kwargs)
        bound = inspect.signature(getattr(Store, op)).bind(self, *args, **kwargs)
        value = bound.arguments[name]
        if isinstance(value, int):
            bound.arguments[name] = self.rng.randint(0, value)
        else:
            bound.arguments[name] = self._subset(list(value))
        return method(*bound.args[1:], **bound.kwargs)

    def _observe(self, op: str, args: tuple[Any, ...], result: Any) -> None:
        if self._observer is not None:
            self._observer(op, args, result)

    def _subset(self, items: Sequence[T]) -> list[T]:
        """A random part of a batch, in its order: what landed before the connection broke."""
        keep = sorted(self.rng.sample(range(len(items)), self.rng.randint(0, len(items))))
        return [items[i] for i in keep]

    # what is not simply delegated

    def server_time_ms(self) -> int | None:
        """The true time of the simulated world, whichever backend: every host judges by it."""

        def read() -> int:
            stored = self.inner.server_time_ms()
            return self._true_ms() if stored is None else stored

        result: int = self._call("server_time_ms", read)
        return result

    def close(self) -> None:
        pass  # the inner store is shared by every view; the world closes it once


def _delegate(op: str) -> Callable[..., Any]:
    def method(self: FaultyStore, *args: Any, **kwargs: Any) -> Any:
        return self._call(op, getattr(self.inner, op), args, kwargs)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = getattr(Store, op).__doc__
    return method


for _op in sorted(Store.__abstractmethods__):
    if _op not in vars(FaultyStore):
        setattr(FaultyStore, _op, _delegate(_op))
abc.update_abstractmethods(FaultyStore)


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
