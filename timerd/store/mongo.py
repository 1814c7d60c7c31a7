"""The distributed store: MongoDB (a replica set) through pymongo's synchronous client.

Only single-document atomic operations and indexes are used (no sessions or transactions), so
the same code runs against mongomock in the contract suite. Writes are acknowledged by the
majority and journaled.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pymongo
import pymongo.errors
from pymongo import ReturnDocument, UpdateOne
from pymongo.collection import Collection

from timerd.errors import StoreUnavailable, TimerStateConflict
from timerd.models import (
    HISTORY_MAX,
    PARTITIONS,
    ApiKey,
    AttemptRecord,
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

Doc = dict[str, Any]
DUPLICATE_KEY = 11000
UPGRADED = 1  # documents of the database are as this release writes them (see `_upgrade`)
PENDING_DUE_INDEX = "pending_due_by_partition"
FIRING_CLAIM_INDEX = "firing_claim_by_partition"

_OPTIONAL_FIELDS = ("idempotency_key", "request_hash", "claim_token")  # absent when unset
_ENCODED = {"id", "headers", "history"}  # stored as `_id`, and as lists of their own
# Every other Timer field is stored as it is (`state` as its string value).
_TIMER_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Timer)
    if f.name not in _ENCODED and f.name not in _OPTIONAL_FIELDS
)


_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "state": lambda state: state.value,
    "callback_state": lambda state: None if state is None else state.value,
    "headers": lambda headers: [list(pair) for pair in headers],
    "history": history_to_dicts,
}


def _encode(values: Mapping[str, Any]) -> Doc:
    """Document fields of Timer fields (given as a Timer holds them): `state` and
    `callback_state` as their strings, `headers` as pairs, `history` as documents."""
    fields = dict(values)
    for name, encode in _ENCODERS.items():
        if name in fields:
            fields[name] = encode(fields[name])
    return fields


_STORED_FIELDS = (*_TIMER_FIELDS, "headers", "history")  # what every document holds


def _to_doc(t: Timer, partitions: int) -> Doc:
    doc: Doc = {"_id": t.id, "partition": partition_of(t.id, partitions)}
    doc.update(_encode({name: getattr(t, name) for name in _STORED_FIELDS}))
    doc.update({name: getattr(t, name) for name in _OPTIONAL_FIELDS if getattr(t, name)})
    return doc


def _update(values: Mapping[str, Any]) -> Doc:
    """The update that sets Timer fields to `values`: optional fields set to None are removed."""
    fields = _encode(values)
    unset = {name: "" for name in _OPTIONAL_FIELDS if name in fields and fields[name] is None}
    changes = {name: value for name, value in fields.items() if name not in unset}
    update: Doc = {"$set": changes} if changes else {}
    return update | ({"$unset": unset} if unset else {})


# Fields documents of earlier releases lack, read as their defaults.
_DEFAULTS = {
    "occurrence": 0,
    "occurrences_failed": 0,
    "callback_attempts": 0,
    "callback_occurrence": 0,
}


def _to_timer(doc: Mapping[str, Any]) -> Timer:
    fields: dict[str, Any] = {name: doc.get(name, _DEFAULTS.get(name)) for name in _TIMER_FIELDS}
    fields["state"] = State(doc["state"])
    if fields["callback_state"] is not None:
        fields["callback_state"] = CallbackState(fields["callback_state"])
    fields["headers"] = tuple((k, v) for k, v in doc.get("headers") or ())
    fields["history"] = history_from_dicts(doc.get("history"))
    fields["tenant"] = doc.get("tenant", "")
    fields.update({name: doc.get(name) for name in _OPTIONAL_FIELDS})
    return Timer(id=doc["_id"], **fields)


def _to_key(doc: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=doc["_id"],
        name=doc["name"],
        tenant=doc["tenant"],
        secret_hash=doc["secret_hash"],
        created_at_ms=doc["created_at_ms"],
        revoked_at_ms=doc.get("revoked_at_ms"),
    )


_SERIES = {True: "$ne", False: "$eq"}  # a series has a schedule, a one-off timer none


def _query(where: TimerFilter) -> Doc:
    """The MongoDB filter of a listing's filter."""
    conditions: Doc = {
        "tenant": where.tenant,
        "state": None if where.state is None else where.state.value,
        "_id": None if where.before_id is None else {"$lt": where.before_id},
        "schedule": None if where.recurring is None else {_SERIES[where.recurring]: None},
    }
    return {name: value for name, value in conditions.items() if value is not None}


def _to_lease(doc: Mapping[str, Any]) -> Lease:
    return Lease(doc["_id"], doc["holder"], doc["epoch"], doc["expires_at_ms"])


def _in_partitions(query: Doc, partitions: Sequence[int] | None) -> Doc:
    """`query`, narrowed to `partitions` when given."""
    return query if partitions is None else {**query, "partition": {"$in": list(partitions)}}


def _complete_op(o: Outcome) -> UpdateOne:
    changes: Doc = {
        "state": o.state.value,
        "last_status": o.status,
        "last_error": o.error,
        "claimed_by": None,
        "claimed_until_ms": None,
    }
    if o.delivered:
        changes["fired_at_ms"] = o.at_ms
        changes["fired_by"] = o.owner
    if o.state is State.PENDING and o.next_due_at_ms is not None:
        changes["due_at_ms"] = o.next_due_at_ms
    if o.state is State.PENDING and o.next_occurrence is not None:
        changes["occurrence"] = o.next_occurrence
        changes["occurrence_at_ms"] = o.next_due_at_ms
        changes["attempts"] = 0
    changes["finished_at_ms"] = None if o.state is State.PENDING else o.at_ms
    update: Doc = {"$set": changes, "$unset": {"claim_token": ""}}
    if o.occurrence_failed:
        update["$inc"] = {"occurrences_failed": 1}
    if o.record is not None:
        update["$push"] = _history_push(o.record.as_dict())
    if o.callback_occurrence is not None:
        changes |= _new_callback(o.at_ms, o.callback_occurrence)
    return UpdateOne({"_id": o.timer_id, "state": "firing", "claim_token": o.claim_token}, update)


def _new_callback(at_ms: int, occurrence: int) -> Doc:
    """The fields of a failure callback made pending, due at `at_ms` (superseding one not yet
    delivered: its claim no longer applies)."""
    return {
        "callback_state": "pending",
        "callback_due_at_ms": at_ms,
        "callback_attempts": 0,
        "callback_token": None,
        "callback_until_ms": None,
        "callback_status": None,
        "callback_error": None,
        "callback_occurrence": occurrence,
    }


def _callback_op(o: CallbackOutcome) -> UpdateOne:
    changes: Doc = {
        "callback_state": o.state.value,
        "callback_token": None,
        "callback_until_ms": None,
        "callback_due_at_ms": o.next_due_at_ms if o.state is CallbackState.PENDING else None,
        "callback_status": o.status,
        "callback_error": o.error,
    }
    fence = {"_id": o.timer_id, "callback_state": "firing", "callback_token": o.claim_token}
    return UpdateOne(fence, {"$set": changes})


def _expired(now_ms: int) -> Doc:
    """The filter of claims whose deadline passed before `now_ms`."""
    return {"state": "firing", "claimed_until_ms": {"$lt": now_ms}}


def _history_push(entry: Doc) -> Doc:
    return {"history": {"$each": [entry], "$slice": -HISTORY_MAX}}


# Server error codes that mean "the same operation may succeed if tried again": elections and
# step-downs, shutdowns, network trouble seen by the server, and operation deadlines.
RETRYABLE_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        50,  # MaxTimeMSExpired
        64,  # WriteConcernFailed
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        112,  # WriteConflict
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)
RETRYABLE_LABELS = ("RetryableWriteError", "TransientTransactionError")


def is_retryable(exc: pymongo.errors.PyMongoError) -> bool:
    """Whether a driver error means "the store is unavailable for now; try again"."""
    if isinstance(
        exc,
        pymongo.errors.ConnectionFailure  # AutoReconnect, NotPrimaryError, NetworkTimeout, …
        | pymongo.errors.WTimeoutError
        | pymongo.errors.WriteConcernError
        | pymongo.errors.ExecutionTimeout,
    ):
        return True
    if getattr(exc, "timeout", False):  # any error that a client-side deadline (timeoutMS) cut
        return True
    if any(exc.has_error_label(label) for label in RETRYABLE_LABELS):
        return True
    if isinstance(exc, pymongo.errors.BulkWriteError):
        return _bulk_is_retryable(exc.details)
    return isinstance(exc, pymongo.errors.OperationFailure) and exc.code in RETRYABLE_CODES


def _bulk_is_retryable(details: Mapping[str, Any]) -> bool:
    """A batch that failed only for write-concern or retryable reasons: trying the whole batch
    again is safe, because every write timerd batches is conditional and idempotent."""
    write_errors = details.get("writeErrors") or []
    if not write_errors and not details.get("writeConcernErrors"):
        return False
    return all(error.get("code") in RETRYABLE_CODES for error in write_errors)


@contextmanager
def translate_errors() -> Iterator[None]:
    """The one place driver errors that mean "try again" become `StoreUnavailable`; any other
    driver error is a bug or a misconfiguration and propagates as it is."""
    try:
        yield
    except pymongo.errors.DuplicateKeyError:
        raise  # callers that expect it handle it; elsewhere it is a bug
    except pymongo.errors.PyMongoError as exc:
        if is_retryable(exc):
            raise StoreUnavailable(f"mongodb: {type(exc).__name__}: {exc}") from exc
        raise


def _hello_time_ms(client: pymongo.MongoClient[Doc]) -> int | None:
    local_time: datetime = client.admin.command("hello")["localTime"]
    return round(local_time.timestamp() * 1000)


class MongoStore(BaseStore):
    """`Store` over a MongoDB database: collections `timers` and `leases`.

    Takes a ready client so tests can pass a `mongomock.MongoClient`; `open_store` builds the
    real one with majority writes and a short server-selection timeout.
    """

    def __init__(
        self,
        client: pymongo.MongoClient[Doc],
        database: str,
        *,
        server_time: Callable[[], int | None] | None = None,
    ) -> None:
        """`server_time` reads the store's clock; by default the primary's `hello.localTime`
        (mongomock, which has no such command, is given one in tests)."""
        self._client = client
        self._server_time = server_time or (lambda: _hello_time_ms(client))
        db = client[database]
        self._timers: Collection[Doc] = db["timers"]
        self._leases: Collection[Doc] = db["leases"]
        self._keys: Collection[Doc] = db["api_keys"]
        self._meta: Collection[Doc] = db["meta"]
        with translate_errors():
            self._partitions = self._fix_partitions()
            self._create_indexes()
            self._upgrade()

    def _partition(self, timer_id: str) -> int:
        return partition_of(timer_id, self._partitions)

    def _fix_partitions(self) -> int:
        """The partition count, written once by the first process to open the database."""
        self._meta.update_one(
            {"_id": "partitions"}, {"$setOnInsert": {"value": PARTITIONS}}, upsert=True
        )
        doc = self._meta.find_one({"_id": "partitions"})
        assert doc is not None
        partitions: int = doc["value"]
        return partitions

    def _upgrade(self) -> None:
        """Bring documents of earlier releases up to date, once per database: the marker in
        `meta` spares every later start a scan of the whole collection (idempotent, so
        processes opening the database at once may both run it)."""
        if self._meta.find_one({"_id": "upgraded", "value": {"$gte": UPGRADED}}) is not None:
            return
        self._leases.delete_many({"_id": "leader"})  # the one lease before partitions
        for old_index in ("pending_due", "firing_claim"):  # now with the partition in them
            if old_index in self._timers.index_information():
                self._timers.drop_index(old_index)
        unpartitioned = {"partition": {"$exists": False}}
        while ids := [d["_id"] for d in self._timers.find(unpartitioned, {"_id": 1}).limit(1000)]:
            ops = [UpdateOne({"_id": i}, {"$set": {"partition": self._partition(i)}}) for i in ids]
            self._timers.bulk_write(ops)
        self._meta.update_one({"_id": "upgraded"}, {"$set": {"value": UPGRADED}}, upsert=True)

    def _create_indexes(self) -> None:
        self._timers.create_index(
            [("due_at_ms", 1), ("_id", 1), ("partition", 1)],
            name=PENDING_DUE_INDEX,
            partialFilterExpression={"state": "pending"},
        )
        self._timers.create_index(
            [("claimed_until_ms", 1), ("partition", 1)],
            name=FIRING_CLAIM_INDEX,
            partialFilterExpression={"state": "firing"},
        )
        self._timers.create_index(
            [("callback_due_at_ms", 1), ("partition", 1)],
            name="callbacks_due",
            partialFilterExpression={"callback_state": "pending"},
        )
        self._timers.create_index(
            [("callback_until_ms", 1), ("partition", 1)],
            name="callbacks_firing",
            partialFilterExpression={"callback_state": "firing"},
        )
        self._timers.create_index([("state", 1), ("_id", -1)], name="state_id")
        self._timers.create_index(
            [("tenant", 1), ("state", 1), ("_id", -1)], name="tenant_state_id"
        )
        self._timers.create_index(
            [("tenant", 1), ("idempotency_key", 1)],
            name="idempotency",
            unique=True,
            partialFilterExpression={"idempotency_key": {"$exists": True}},
        )
        self._timers.create_index(
            [("finished_at_ms", 1)],
            name="finished",
            partialFilterExpression={"finished_at_ms": {"$gt": 0}},
        )
        self._timers.create_index([("tenant", 1), ("_id", -1)], name="tenant_id")
        self._timers.create_index(
            [("claim_token", 1)],
            name="firing_token",
            partialFilterExpression={"state": "firing"},
        )

    # timers

    def partitions(self) -> int:
        return self._partitions

    def timer_indexes(self) -> Mapping[str, Any]:
        """The indexes of the `timers` collection by name, as pymongo's `index_information`
        describes them (which fields, in which order, over which documents)."""
        with translate_errors():
            return self._timers.index_information()

    def insert(self, timer: Timer) -> Timer:
        with translate_errors():
            try:
                self._timers.insert_one(_to_doc(timer, self._partitions))
            except pymongo.errors.DuplicateKeyError:
                existing = key_holder(timer, self.find_by_idempotency_key)
                if existing is None:  # cannot happen: only the idempotency index can refuse
                    raise
                return existing
        return timer

    def insert_many(self, timers: Sequence[Timer]) -> list[Timer]:
        if not timers:
            return []
        docs = [_to_doc(t, self._partitions) for t in timers]
        with translate_errors():
            try:
                self._timers.insert_many(docs, ordered=False)
            except pymongo.errors.BulkWriteError as exc:
                if any(e.get("code") != DUPLICATE_KEY for e in exc.details["writeErrors"]):
                    raise
                refused = {e["index"] for e in exc.details["writeErrors"]}
                return [self._existing(t) if i in refused else t for i, t in enumerate(timers)]
        return list(timers)

    def _existing(self, timer: Timer) -> Timer:
        """The timer that holds `timer`'s idempotency key (its insert was refused for it)."""
        existing = key_holder(timer, self.find_by_idempotency_key)
        if existing is None:  # cannot happen: only the idempotency index can refuse an insert
            raise TimerStateConflict(timer.id, "already stored")
        return existing

    def find_by_idempotency_key(self, tenant: str, key: str) -> Timer | None:
        with translate_errors():
            doc = self._timers.find_one({"tenant": tenant, "idempotency_key": key})
        return None if doc is None else _to_timer(doc)

    def _find(self, timer_id: str) -> Timer | None:
        with translate_errors():
            doc = self._timers.find_one({"_id": timer_id})
        return None if doc is None else _to_timer(doc)

    def _update_if(
        self, timer_id: str, tenant: str | None, when: InState, values: Mapping[str, Any]
    ) -> Timer | None:
        either: list[Doc] = [{"state": {"$in": [s.value for s in when.states]}}]
        if when.series_states:
            series_states = [s.value for s in when.series_states]
            either.append({"schedule": {"$ne": None}, "state": {"$in": series_states}})
        query: Doc = {"_id": timer_id, "$or": either}
        if tenant is not None:
            query["tenant"] = tenant
        update = _update(values)
        with translate_errors():
            doc = (
                self._timers.find_one_and_update(
                    query, update, return_document=ReturnDocument.AFTER
                )
                if update
                else self._timers.find_one(query)
            )
        return None if doc is None else _to_timer(doc)

    def count_pending(self, tenant: str, limit: int) -> int:
        if limit <= 0:  # MongoDB reads limit 0 as no limit at all
            return 0
        with translate_errors():
            return self._timers.count_documents({"tenant": tenant, "state": "pending"}, limit=limit)

    def pending_due(
        self,
        before_ms: int,
        limit: int,
        after: tuple[int, str] | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[Due]:
        if limit <= 0:  # MongoDB reads limit(0) as no limit at all
            return []
        query = _in_partitions({"state": "pending", "due_at_ms": {"$lt": before_ms}}, partitions)
        if after is not None:
            after_due, after_id = after
            query["$or"] = [
                {"due_at_ms": {"$gt": after_due}},
                {"due_at_ms": after_due, "_id": {"$gt": after_id}},
            ]
        with translate_errors():
            cursor = (
                self._timers.find(query, {"due_at_ms": 1, "url": 1})
                .sort([("due_at_ms", 1), ("_id", 1)])
                .limit(limit)
            )
            return [Due(id=d["_id"], due_at_ms=d["due_at_ms"], url=d["url"]) for d in cursor]

    def next_due_at_ms(self) -> int | None:
        with translate_errors():
            docs = list(
                self._timers.find({"state": "pending"}, {"due_at_ms": 1})
                .sort([("due_at_ms", 1), ("_id", 1)])
                .limit(1)
            )
        return docs[0]["due_at_ms"] if docs else None

    def count_by_state(self) -> dict[State, int]:
        with translate_errors():
            groups = self._timers.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
            return {State(g["_id"]): g["n"] for g in groups}

    def count_series(self) -> int:
        query = {"schedule": {"$ne": None}, "state": {"$in": ["pending", "firing", "paused"]}}
        with translate_errors():
            return self._timers.count_documents(query)

    def count_active(self) -> dict[State, int]:
        # Each count matches its partial index's filter exactly, so the index alone answers.
        with translate_errors():
            return {
                state: self._timers.count_documents({"state": state.value}, hint=index)
                for state, index in (
                    (State.PENDING, PENDING_DUE_INDEX),
                    (State.FIRING, FIRING_CLAIM_INDEX),
                )
            }

    def claim_due(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        if not timer_ids:
            return []
        ids = list(timer_ids)
        with translate_errors():
            self._timers.update_many(
                {"_id": {"$in": ids}, "state": "pending", "due_at_ms": {"$lte": claim.now_ms}},
                {
                    "$set": {
                        "state": "firing",
                        "claimed_by": claim.owner,
                        "claimed_until_ms": claim.until_ms,
                        "claim_token": claim.token,
                    },
                    "$inc": {"attempts": 1},
                },
            )
            docs = self._timers.find({"_id": {"$in": ids}, "claim_token": claim.token})
            return [_to_timer(d) for d in docs]

    def release_claim(self, token: str) -> int:
        with translate_errors():
            result = self._timers.update_many(
                {"claim_token": token, "state": "firing"},
                {
                    "$set": {"state": "pending", "claimed_by": None, "claimed_until_ms": None},
                    "$unset": {"claim_token": ""},
                    "$inc": {"attempts": -1},
                },
            )
        return result.modified_count

    def complete(self, outcomes: Sequence[Outcome]) -> int:
        if not outcomes:
            return 0
        with translate_errors():
            result = self._timers.bulk_write([_complete_op(o) for o in outcomes], ordered=False)
        return result.modified_count

    def _list(self, where: TimerFilter, limit: int) -> list[Timer]:
        with translate_errors():
            docs = self._timers.find(_query(where)).sort("_id", -1).limit(limit)
            return [_to_timer(d) for d in docs]

    def recover_expired(
        self, now_ms: int, limit: int, max_attempts: int, partitions: Sequence[int] | None = None
    ) -> int:
        if limit <= 0:  # MongoDB reads limit(0) as "no limit"
            return 0
        fields = {
            "attempts": 1,
            "max_attempts": 1,
            "claim_token": 1,
            "schedule": 1,
            "on_failure_url": 1,
        }
        query = _in_partitions(_expired(now_ms), partitions)
        with translate_errors():
            docs = list(self._timers.find(query, fields).limit(limit))
            return sum(self._settle_expired(doc, now_ms, max_attempts) for doc in docs)

    def _settle_expired(self, doc: Doc, now_ms: int, max_attempts: int) -> int:
        """One expired claim as a failed attempt, conditional on that very claim."""
        spent = doc["attempts"] >= (doc.get("max_attempts") or max_attempts)
        spent = spent and doc.get("schedule") is None  # a series moves on at its next attempt
        record = AttemptRecord(doc["attempts"], now_ms, latency_ms=0, error=CLAIM_EXPIRED)
        changes = {
            "state": "failed" if spent else "pending",
            "finished_at_ms": now_ms if spent else None,
            "last_status": None,
            "last_error": CLAIM_EXPIRED,
            "claimed_by": None,
            "claimed_until_ms": None,
        }
        if spent and doc.get("on_failure_url") is not None:
            changes |= _new_callback(now_ms, 0)
        result = self._timers.update_one(
            {"_id": doc["_id"], "claim_token": doc.get("claim_token"), **_expired(now_ms)},
            {
                "$set": changes,
                "$unset": {"claim_token": ""},
                "$push": _history_push(record.as_dict()),
            },
        )
        return result.modified_count

    # failure callbacks

    def callbacks_due(
        self, before_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> list[Due]:
        if limit <= 0:
            return []
        query = _in_partitions(
            {"callback_state": "pending", "callback_due_at_ms": {"$lt": before_ms}}, partitions
        )
        with translate_errors():
            fields = {"callback_due_at_ms": 1, "on_failure_url": 1}
            docs = self._timers.find(query, fields).sort("callback_due_at_ms", 1).limit(limit)
            return [Due(d["_id"], d["callback_due_at_ms"], d["on_failure_url"]) for d in docs]

    def claim_callbacks(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        if not timer_ids:
            return []
        ids = list(timer_ids)
        due = {"callback_state": "pending", "callback_due_at_ms": {"$lte": claim.now_ms}}
        with translate_errors():
            self._timers.update_many(
                {"_id": {"$in": ids}, **due},
                {
                    "$set": {
                        "callback_state": "firing",
                        "callback_token": claim.token,
                        "callback_until_ms": claim.until_ms,
                    },
                    "$inc": {"callback_attempts": 1},
                },
            )
            docs = self._timers.find({"_id": {"$in": ids}, "callback_token": claim.token})
            return [_to_timer(d) for d in docs]

    def complete_callbacks(self, outcomes: Sequence[CallbackOutcome]) -> int:
        if not outcomes:
            return 0
        with translate_errors():
            result = self._timers.bulk_write([_callback_op(o) for o in outcomes], ordered=False)
        return result.modified_count

    def recover_expired_callbacks(
        self, now_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> int:
        if limit <= 0:
            return 0
        expired = {"callback_state": "firing", "callback_until_ms": {"$lt": now_ms}}
        query = _in_partitions(expired, partitions)
        with translate_errors():
            docs = list(self._timers.find(query, {"_id": 1, "callback_token": 1}).limit(limit))
            changes = {
                "callback_state": "pending",
                "callback_token": None,
                "callback_until_ms": None,
                "callback_status": None,
                "callback_error": CLAIM_EXPIRED,
            }
            return sum(
                self._timers.update_one(
                    {"_id": d["_id"], "callback_token": d.get("callback_token"), **expired},
                    {"$set": changes},
                ).modified_count
                for d in docs
            )

    def purge_finished(self, before_ms: int, limit: int) -> int:
        if limit <= 0:
            return 0
        finished = {
            "finished_at_ms": {"$gt": 0, "$lt": before_ms},  # within the partial index
            "callback_state": {"$nin": ["pending", "firing"]},  # a callback still to send
        }
        with translate_errors():
            ids = [d["_id"] for d in self._timers.find(finished, {"_id": 1}).limit(limit)]
            if not ids:
                return 0
            return self._timers.delete_many({"_id": {"$in": ids}, **finished}).deleted_count

    # leases

    def acquire_lease(self, name: str, holder: str, ttl_ms: int, now_ms: int) -> Lease | None:
        expires = now_ms + ttl_ms
        with translate_errors():
            doc = self._leases.find_one_and_update(
                {"_id": name, "holder": holder},
                {"$set": {"expires_at_ms": expires}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:
                doc = self._take_lease(name, holder, expires, now_ms)
        return None if doc is None else _to_lease(doc)

    def _take_lease(self, name: str, holder: str, expires: int, now_ms: int) -> Doc | None:
        try:
            return self._leases.find_one_and_update(
                {"_id": name, "expires_at_ms": {"$lt": now_ms}},
                {"$set": {"holder": holder, "expires_at_ms": expires}, "$inc": {"epoch": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except pymongo.errors.DuplicateKeyError:  # the lease exists and is live: someone holds it
            return None

    def renew_leases(
        self, holder: str, names: Sequence[str], ttl_ms: int, now_ms: int
    ) -> list[str]:
        if not names:
            return []
        mine = {"_id": {"$in": list(names)}, "holder": holder}
        with translate_errors():
            self._leases.update_many(mine, {"$set": {"expires_at_ms": now_ms + ttl_ms}})
            return [d["_id"] for d in self._leases.find(mine, {"_id": 1})]

    def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        with translate_errors():
            result = self._leases.update_one(
                {"_id": name, "holder": holder, "epoch": epoch, "expires_at_ms": {"$gt": 0}},
                {"$set": {"expires_at_ms": 0}},
            )
        return result.modified_count == 1

    def get_lease(self, name: str) -> Lease | None:
        with translate_errors():
            doc = self._leases.find_one({"_id": name})
        return None if doc is None else _to_lease(doc)

    def leases(self) -> list[Lease]:
        with translate_errors():
            return [_to_lease(d) for d in self._leases.find().sort("_id", 1)]

    def delete_leases(self, prefix: str, expired_before_ms: int) -> int:
        query = {
            "_id": {"$regex": f"^{re.escape(prefix)}"},
            "expires_at_ms": {"$lt": expired_before_ms},
        }
        with translate_errors():
            return self._leases.delete_many(query).deleted_count

    # API keys

    def add_key(self, key: ApiKey) -> None:
        doc = {
            "_id": key.key_id,
            "name": key.name,
            "tenant": key.tenant,
            "secret_hash": key.secret_hash,
            "created_at_ms": key.created_at_ms,
            "revoked_at_ms": key.revoked_at_ms,
        }
        with translate_errors():
            self._keys.insert_one(doc)

    def get_key(self, key_id: str) -> ApiKey | None:
        with translate_errors():
            doc = self._keys.find_one({"_id": key_id})
        return None if doc is None else _to_key(doc)

    def list_keys(self) -> list[ApiKey]:
        with translate_errors():
            return [_to_key(d) for d in self._keys.find().sort([("created_at_ms", 1), ("_id", 1)])]

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        with translate_errors():
            result = self._keys.update_one(
                {"_id": key_id, "revoked_at_ms": None}, {"$set": {"revoked_at_ms": now_ms}}
            )
        return result.modified_count == 1

    # lifecycle

    def server_time_ms(self) -> int | None:
        with translate_errors():
            return self._server_time()

    def checkpoint(self) -> None:
        pass  # the server manages its journal

    def ping(self) -> None:
        with translate_errors():
            self._timers.find_one({}, {"_id": 1})

    def close(self) -> None:
        self._client.close()

    # reads for the console

    def count_by_state_of(self, tenant: str, limit: int) -> dict[State, int]:
        if limit <= 0:  # MongoDB reads limit 0 as no limit at all
            return dict.fromkeys(State, 0)
        with translate_errors():
            return {
                state: self._timers.count_documents(
                    {"tenant": tenant, "state": state.value}, limit=limit
                )
                for state in State
            }

    def earliest_pending_of(self, tenant: str) -> Due | None:
        query = {"tenant": tenant, "state": "pending"}
        with translate_errors():
            cursor = self._timers.find(query, {"due_at_ms": 1, "url": 1})
            docs = list(cursor.sort([("due_at_ms", 1), ("_id", 1)]).limit(1))
        return next((Due(id=d["_id"], due_at_ms=d["due_at_ms"], url=d["url"]) for d in docs), None)

    def _scan_by_url(
        self, url_prefix: str, where: TimerFilter, limit: int, scan: int
    ) -> tuple[list[Timer], str | None]:
        query = _query(where)
        with translate_errors():
            edges = list(
                self._timers.find(query, {"_id": 1}).sort("_id", -1).skip(scan - 1).limit(1)
            )
            edge_id: str | None = edges[0]["_id"] if edges else None
            ids = {**query.get("_id", {}), **({"$gte": edge_id} if edge_id else {})}
            matching = {**query, "url": {"$regex": "^" + re.escape(url_prefix)}}
            if ids:
                matching["_id"] = ids
            docs = self._timers.find(matching).sort("_id", -1).limit(limit)
            return [_to_timer(d) for d in docs], edge_id
