"""The errors each store's driver really raises when the store is unavailable for a while, as
factories, for the tests that check each is mapped to `StoreUnavailable` and for the simulator
that injects them at every call."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pymongo.errors

Fault = Callable[[], Exception]


def _bulk(details: dict[str, object]) -> Exception:
    return pymongo.errors.BulkWriteError(details)


def _failure(code: int, name: str) -> Exception:
    return pymongo.errors.OperationFailure(f"{name} (simulated)", code)


def _labelled() -> Exception:
    error = pymongo.errors.OperationFailure("transient (simulated)", 251)
    error._add_error_label("TransientTransactionError")
    return error


MONGO_FAULTS: dict[str, Fault] = {
    "AutoReconnect": lambda: pymongo.errors.AutoReconnect("connection lost"),
    "NotPrimaryError": lambda: pymongo.errors.NotPrimaryError("not primary"),
    "NetworkTimeout": lambda: pymongo.errors.NetworkTimeout("timed out"),
    "ServerSelectionTimeoutError": lambda: pymongo.errors.ServerSelectionTimeoutError("no primary"),
    "ConnectionFailure": lambda: pymongo.errors.ConnectionFailure("refused"),
    "WTimeoutError": lambda: pymongo.errors.WTimeoutError("waiting for replication", 64),
    "WriteConcernError": lambda: pymongo.errors.WriteConcernError("write concern", 100),
    "ExecutionTimeout": lambda: pymongo.errors.ExecutionTimeout("time limit", 50),
    "PrimarySteppedDown": lambda: _failure(189, "PrimarySteppedDown"),
    "InterruptedDueToReplStateChange": lambda: _failure(11602, "InterruptedDueToReplStateChange"),
    "NotWritablePrimary": lambda: _failure(10107, "NotWritablePrimary"),
    "ShutdownInProgress": lambda: _failure(91, "ShutdownInProgress"),
    "ExceededTimeLimit": lambda: _failure(262, "ExceededTimeLimit"),
    "TransientTransactionError label": _labelled,
    "BulkWriteError (write concern)": lambda: _bulk(
        {"writeErrors": [], "writeConcernErrors": [{"code": 64, "errmsg": "waiting"}]}
    ),
    "BulkWriteError (step-down)": lambda: _bulk(
        {"writeErrors": [{"index": 0, "code": 11602, "errmsg": "stepped down"}]}
    ),
}

SQLITE_FAULTS: dict[str, Fault] = {
    "locked": lambda: sqlite3.OperationalError("database is locked"),
    "busy": lambda: sqlite3.OperationalError("database is busy"),
    "disk I/O error": lambda: sqlite3.OperationalError("disk I/O error"),
    "unable to open": lambda: sqlite3.OperationalError("unable to open database file"),
    "disk full": lambda: sqlite3.OperationalError("database or disk is full"),
}
