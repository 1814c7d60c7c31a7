"""Each driver error that means "try again" becomes `StoreUnavailable`, in the one place each
adapter translates errors, and reaches callers through every store method; other errors pass
through unchanged (they are bugs or misconfigurations, which end the daemon loudly)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mongomock
import pymongo.errors
import pytest

from tests.support.driver_faults import MONGO_FAULTS, SQLITE_FAULTS, Fault
from timerd import store as store_module
from timerd.errors import ConfigError, StoreUnavailable
from timerd.models import Claim, Timer, new_claim_token, new_timer_id
from timerd.store import mongo as mongo_adapter
from timerd.store import open_store
from timerd.store import sqlite as sqlite_adapter
from timerd.store.mongo import MongoStore

NOW_MS = 1_700_000_000_000


@pytest.mark.parametrize("fault", MONGO_FAULTS.values(), ids=MONGO_FAULTS.keys())
def test_each_retryable_mongo_error_becomes_store_unavailable(fault: Fault) -> None:
    with pytest.raises(StoreUnavailable), mongo_adapter.translate_errors():
        raise fault()


@pytest.mark.parametrize("fault", SQLITE_FAULTS.values(), ids=SQLITE_FAULTS.keys())
def test_each_retryable_sqlite_error_becomes_store_unavailable(fault: Fault) -> None:
    with pytest.raises(StoreUnavailable), sqlite_adapter.translate_errors():
        raise fault()


NOT_RETRYABLE: dict[str, Fault] = {
    "Unauthorized": lambda: pymongo.errors.OperationFailure("not authorized", 13),
    "BadValue": lambda: pymongo.errors.OperationFailure("bad value", 2),
    "DuplicateKeyError": lambda: pymongo.errors.DuplicateKeyError("dup", 11000),
    "BulkWriteError (a document's own error)": lambda: pymongo.errors.BulkWriteError(
        {"writeErrors": [{"index": 0, "code": 2, "errmsg": "bad"}], "writeConcernErrors": []}
    ),
}


@pytest.mark.parametrize("fault", NOT_RETRYABLE.values(), ids=NOT_RETRYABLE.keys())
def test_other_mongo_errors_pass_through_unchanged(fault: Fault) -> None:
    error = fault()
    with pytest.raises(type(error)) as raised, mongo_adapter.translate_errors():
        raise error
    assert raised.value is error


def a_timer() -> Timer:
    return Timer(id=new_timer_id(), url="https://r.example/h", due_at_ms=NOW_MS, created_at_ms=0)


def a_claim() -> Claim:
    return Claim("a", NOW_MS, NOW_MS + 30_000, new_claim_token())


CALLS: dict[str, Callable[[Any], object]] = {
    "insert": lambda s: s.insert(a_timer()),
    "pending_due": lambda s: s.pending_due(NOW_MS, 10),
    "claim_due": lambda s: s.claim_due([new_timer_id()], a_claim()),
    "release_claim": lambda s: s.release_claim("t"),
    "recover_expired": lambda s: s.recover_expired(NOW_MS, 10, 3),
    "acquire_lease": lambda s: s.acquire_lease("p0", "a", 10_000, NOW_MS),
    "server_time_ms": lambda s: s.server_time_ms(),
}


class _FailingClient:
    """A mongomock client whose collections, once `armed`, raise `fault` on every operation:
    the store opens on it as on a real one, then meets the fault at every call."""

    def __init__(self, fault: Fault) -> None:
        self._client: Any = mongomock.MongoClient()
        self.fault = fault
        self.armed = False

    def __getitem__(self, database: str) -> _Database:
        return _Database(self, self._client[database])

    def close(self) -> None:
        self._client.close()


class _Database:
    def __init__(self, client: _FailingClient, database: Any) -> None:
        self._client, self._database = client, database

    def __getitem__(self, name: str) -> _Collection:
        return _Collection(self._client, self._database[name])


class _Collection:
    def __init__(self, client: _FailingClient, collection: Any) -> None:
        self._client, self._collection = client, collection

    def __getattr__(self, name: str) -> Any:
        if not self._client.armed:
            return getattr(self._collection, name)

        def fail(*_: object, **__: object) -> object:
            raise self._client.fault()

        return fail


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("fault", MONGO_FAULTS.values(), ids=MONGO_FAULTS.keys())
def test_mongo_store_methods_raise_store_unavailable(
    fault: Fault, call: Callable[[Any], object]
) -> None:
    def server_time() -> int:
        raise fault()

    client = _FailingClient(fault)
    store = MongoStore(client, "timerd", server_time=server_time)  # type: ignore[arg-type]
    client.armed = True
    with pytest.raises(StoreUnavailable):
        call(store)


def test_a_sqlite_file_that_cannot_be_written_raises_store_unavailable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    try:
        (tmp_path / "timerd.db").chmod(0o400)
        with sqlite3.connect(tmp_path / "timerd.db") as locker:
            locker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailable):
                store.claim_due([new_timer_id()], a_claim())
    finally:
        store.close()


@pytest.mark.parametrize(
    "options", ["w=1", "w=0", "w=2", "journal=false", "w=majority&journal=false"]
)
def test_a_write_concern_below_majority_is_refused_at_start(options: str) -> None:
    with pytest.raises(ConfigError, match="TIMERD_ALLOW_WEAK_WRITES"):
        open_store(f"mongodb://127.0.0.1:1/timerd?{options}")


def test_operations_have_deadlines_and_the_daemon_outlasts_an_election(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: dict[str, dict[str, Any]] = {}

    def client(url: str, **options: Any) -> mongomock.MongoClient:
        made[url] = options
        return mongomock.MongoClient()

    monkeypatch.setattr(store_module.pymongo, "MongoClient", client)
    open_store("mongodb://127.0.0.1/api")
    open_store("mongodb://127.0.0.1/daemon", for_daemon=True)
    open_store("mongodb://127.0.0.1/weak?w=1&timeoutMS=100", allow_weak_writes=True)

    api, daemon = made["mongodb://127.0.0.1/api"], made["mongodb://127.0.0.1/daemon"]
    assert api["timeoutMS"] == api["serverSelectionTimeoutMS"] == 5_000
    assert daemon["timeoutMS"] == daemon["serverSelectionTimeoutMS"] == 30_000
    assert api["w"] == daemon["w"] == "majority" and api["journal"] is daemon["journal"] is True
    weak = made["mongodb://127.0.0.1/weak?w=1&timeoutMS=100"]
    assert "w" not in weak and "timeoutMS" not in weak  # the URL's own options stand
