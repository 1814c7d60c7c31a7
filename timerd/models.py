"""The records timerd stores: timers, claims, outcomes and the leader lease."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import bson


class State(enum.StrEnum):
    """Where a timer is in its life: `pending` until claimed, then `firing` until delivered
    (`fired`), out of retries (`failed`) or due again (`pending`); only a pending timer (or a
    series) can be `cancelled`. See "Read a timer" in the README."""

    PENDING = "pending"
    FIRING = "firing"
    FIRED = "fired"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # a series stopped by `POST /timers/{id}/pause` until resumed


class CallbackState(enum.StrEnum):
    """Where a timer's failure callback (`on_failure_url`) is; None on a timer with none yet."""

    PENDING = "pending"  # due at `callback_due_at_ms`
    FIRING = "firing"  # claimed under `callback_token` until `callback_until_ms`
    DELIVERED = "delivered"
    FAILED = "failed"  # its retries are spent


def new_timer_id() -> str:
    """A fresh 24-hex ObjectId string, the id format of the seed."""
    return str(bson.ObjectId())


def is_timer_id(value: str) -> bool:
    """Whether `value` has the shape of a timer id (24 lowercase or uppercase hex digits)."""
    return len(value) == 24 and bson.ObjectId.is_valid(value)


HISTORY_MAX = 10  # attempts kept per timer, newest last
RESPONSE_PREFIX_CHARS = 256  # of a receiver's answer, kept in the attempt history


# Not frozen (and so not hashable): a frozen dataclass sets each field through object.__setattr__,
# ten times slower to build, and the daemon builds one of these for every claim, attempt and
# outcome. Treat them as values all the same: change one with `dataclasses.replace`.
@dataclass(slots=True)
class AttemptRecord:
    """One delivery attempt as the history keeps it."""

    attempt: int
    at_ms: int
    latency_ms: float
    status: int | None = None
    error: str | None = None
    response: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as a plain dict, for JSON or BSON (`dataclasses.asdict` is ten times
        slower, and this runs once per delivery)."""
        return {
            "attempt": self.attempt,
            "at_ms": self.at_ms,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "error": self.error,
            "response": self.response,
        }


def history_to_dicts(history: tuple[AttemptRecord, ...]) -> list[dict[str, Any]]:
    """The history as plain dicts, for storing as JSON or BSON."""
    return [record.as_dict() for record in history]


def history_from_dicts(items: list[dict[str, Any]] | None) -> tuple[AttemptRecord, ...]:
    """The history back from plain dicts."""
    return tuple(AttemptRecord(**item) for item in items or ())


@dataclass(slots=True)  # not frozen: see AttemptRecord
class Timer:
    """One timer as stored. `due_at_ms` is when it fires next (UTC epoch milliseconds)."""

    id: str
    url: str
    due_at_ms: int
    created_at_ms: int
    state: State = State.PENDING
    attempts: int = 0
    fired_at_ms: int | None = None
    claimed_by: str | None = None
    claimed_until_ms: int | None = None
    claim_token: str | None = None  # of the claim the timer is firing under; None when not firing
    last_status: int | None = None
    last_error: str | None = None
    payload: str | None = None  # the client's JSON value, as canonical JSON text
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers chosen by the client
    max_attempts: int | None = None  # None: as many as the retry schedule allows
    history: tuple[AttemptRecord, ...] = ()  # the newest HISTORY_MAX attempts, oldest first
    tenant: str = ""  # who owns it: the tenant of the API key that created it ("" without keys)
    idempotency_key: str | None = None  # unique per tenant when given
    request_hash: str | None = None  # of the create request, to tell a retry from a conflict
    finished_at_ms: int | None = None  # when it became fired, failed or cancelled (retention)
    fired_by: str | None = None  # the daemon that delivered it
    schedule: str | None = None  # a series' `schedules.Schedule` as JSON text; None: one-off
    occurrence: int = 0  # a series' current occurrence, numbered from 1; 0 for a one-off
    occurrence_at_ms: int | None = None  # when the current occurrence is scheduled
    occurrences_failed: int = 0  # occurrences of the series that ended failed
    on_failure_url: str | None = None  # where `timer.failed` goes (see `timerd.callbacks`)
    callback_state: CallbackState | None = None  # of the latest failure's callback
    callback_due_at_ms: int | None = None
    callback_attempts: int = 0
    callback_token: str | None = None  # of the claim the callback is firing under
    callback_until_ms: int | None = None
    callback_status: int | None = None  # of its last attempt
    callback_error: str | None = None
    callback_occurrence: int = 0  # the series' occurrence that failed; 0 for a one-off

    @property
    def recurring(self) -> bool:
        """Whether the timer is a series (it has a schedule)."""
        return self.schedule is not None

    @property
    def webhook_id(self) -> str:
        """The `webhook-id` of its deliveries: the id, and `<id>_<n>` for occurrence n of a
        series (the same across retries of that occurrence, distinct between occurrences)."""
        return f"{self.id}_{self.occurrence}" if self.recurring else self.id

    def time_left_s(self, now_ms: int) -> int:
        """Whole seconds until the timer fires, rounded up; 0 once due or no longer pending."""
        if self.state is not State.PENDING or self.due_at_ms <= now_ms:
            return 0
        return -((now_ms - self.due_at_ms) // 1000)


@dataclass(frozen=True, slots=True)
class Due:
    """A pending timer's id, due time and URL, as the due-index query returns it."""

    id: str
    due_at_ms: int
    url: str


def new_claim_token() -> str:
    """A token unique to one claim: its outcomes and its release name it."""
    return new_timer_id()


@dataclass(frozen=True, slots=True)
class Claim:
    """Who claims due timers (the holder of their partitions' leases), until a deadline, with a
    token no other claim has (outcomes and releases apply only under it)."""

    owner: str
    now_ms: int
    until_ms: int
    token: str


@dataclass(slots=True)  # not frozen: see AttemptRecord
class Outcome:
    """The result of one delivery attempt, written back under the claim it was made for.

    `state` is FIRED (delivered), FAILED (gave up) or PENDING (retry at `next_due_at_ms`).
    `record` is the attempt to add to the history; None when no attempt was made.

    For a series, `next_occurrence` (with state PENDING) says the current occurrence ended and
    the series goes on with that occurrence, scheduled (and due) at `next_due_at_ms`, with a
    fresh attempt budget; `occurrence_failed` that the occurrence that ended failed (also when it
    was the last one and the state is FAILED). One write records both. `callback_occurrence`
    (set when a timer with an `on_failure_url`, or an occurrence of one, ended failed) makes its
    failure callback pending, due at `at_ms`, for that occurrence (0 for a one-off), in that
    same write.
    """

    timer_id: str
    claim_token: str
    state: State
    at_ms: int
    status: int | None = None
    error: str | None = None
    next_due_at_ms: int | None = None
    record: AttemptRecord | None = None
    owner: str | None = None  # the daemon that made the attempt
    next_occurrence: int | None = None
    occurrence_failed: bool = False
    callback_occurrence: int | None = None  # not None: the timer's failure callback is due now

    @property
    def delivered(self) -> bool:
        """Whether the attempt delivered (a one-off fired, or a series' occurrence did)."""
        return self.state is State.FIRED or (
            self.next_occurrence is not None and not self.occurrence_failed
        )


@dataclass(frozen=True, slots=True)
class TimerChanges:
    """What `PATCH /timers/{id}` may change on a pending timer; None leaves a field as it is."""

    due_at_ms: int | None = None
    url: str | None = None
    payload: str | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    schedule: str | None = None  # a series' new schedule; `due_at_ms` is then its first time
    on_failure_url: str | None = None


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """The result of one failure-callback attempt, written under its claim's token: DELIVERED,
    FAILED (retries spent) or PENDING (again at `next_due_at_ms`)."""

    timer_id: str
    claim_token: str
    state: CallbackState
    at_ms: int
    status: int | None = None
    error: str | None = None
    next_due_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: only a hash of its secret, never the secret."""

    key_id: str
    name: str
    tenant: str
    secret_hash: str
    created_at_ms: int
    revoked_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease document: who holds `name`, under which epoch (raised by every new holder),
    until when (the store's clock). Partition `n`'s lease is named `p<n>`; each live daemon
    also keeps one named `member:<holder>`, by which the daemons know one another."""

    name: str
    holder: str
    epoch: int
    expires_at_ms: int


PARTITIONS = 64  # of the timer space, fixed when a store is created
MEMBER_PREFIX = "member:"


def partition_lease(partition: int) -> str:
    """The name of a partition's lease."""
    return f"p{partition}"


def member_lease(holder: str) -> str:
    """The name of the lease by which a live daemon makes itself known."""
    return MEMBER_PREFIX + holder


def partition_scope(held: list[int], partitions: int) -> list[int] | None:
    """The partitions filter of a store call over the `held` ones of `partitions`: None (no
    filter) when they are all of them."""
    return None if len(held) == partitions else held


def partition_of(timer_id: str, partitions: int) -> int:
    """The partition a timer belongs to: from the counter at the end of its ObjectId, so
    consecutive creates spread evenly."""
    return int(timer_id[-6:], 16) % partitions
