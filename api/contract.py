"""The HTTP contract as typed models: one msgspec Struct per body and answer.

Request bodies (`CreateTimer`, `ChangeTimer`, `BatchItem`) name every field a body may hold, and
the checks of `api.validation` refuse any other (`unknown_field`), so the two cannot differ.
Answers (`TimerView`, `TimerPage`, `BatchAnswer`, `ErrorBody`) are built as these Structs and
encoded by msgspec. `api.openapi` takes its components from `msgspec.json.schema_components` over
them and sets the limits in force from the live `Settings`.

Why msgspec rather than pydantic v2: it encodes and decodes several times faster, is strict by
default (no silent coercion of `"3"` to 3), writes JSON Schema 2020-12 (what OpenAPI 3.1 uses)
from the same classes, and is one small compiled dependency with no dependencies of its own.
The field checks that need our own messages and cross-field rules (duration vs `fire_at`, the
SSRF and deliverability checks on URLs, header names, series fields) are in `api.validation`
and `api.series`, next to these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from timerd.models import HISTORY_MAX

MAX_ATTEMPTS_CAP = 100
BATCH_MAX = 1000  # timers one POST /timers/batch may hold
TIMER_ID_PATTERN = "^[0-9a-fA-F]{24}$"
# Written once: `api.validation` matches them whole, `api.openapi` quotes them.
HEADER_NAME_PATTERN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}"
HEADER_VALUE_PATTERN = r"[\x20-\x7e\t]{0,1024}"
IDEMPOTENCY_KEY_PATTERN = r"[\x21-\x7e]{1,255}"

DateTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
TimerId = Annotated[str, Meta(pattern=TIMER_ID_PATTERN)]
Count = Annotated[int, Meta(ge=0)]
Delay = Annotated[
    float,
    Meta(
        ge=0,
        description="From now; a non-negative integer or decimal, kept to the millisecond; 0 "
        "when left out.",
    ),
]
Url = Annotated[
    str,
    Meta(
        extra_json_schema={"format": "uri"},
        description="An absolute `http` or `https` URL with a host, without user-info, a "
        "fragment, spaces or control characters. A host that is a loopback name or a literal "
        "non-public address is refused (422) unless `TIMERD_ALLOWED_NETWORKS` allows it; host "
        "names are not resolved here. The webhook goes to the URL with `/<id>` appended to its "
        "path.",
        examples=["https://example.com/hooks"],
    ),
]
MaxAttempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_CAP)]
Headers = dict[str, str]
CatchUp = Literal["once", "all"]


class _TimeFields(Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields that say when a timer fires (a one-off) or on what schedule (a series)."""

    hours: Delay | UnsetType = UNSET
    minutes: Delay | UnsetType = UNSET
    seconds: Delay | UnsetType = UNSET
    fire_at: DateTime | UnsetType = UNSET
    fire_at_local: str | UnsetType = UNSET
    every: str | UnsetType = UNSET
    start_at: DateTime | UnsetType = UNSET
    cron: str | UnsetType = UNSET
    timezone: str | UnsetType = UNSET
    until: DateTime | UnsetType | None = UNSET
    max_occurrences: Annotated[int, Meta(ge=1, le=1000000000)] | UnsetType | None = UNSET
    catch_up: CatchUp | UnsetType = UNSET


class CreateTimer(_TimeFields, kw_only=True, forbid_unknown_fields=True):
    """A webhook `url` and when to call it (see `api.openapi` for the whole description)."""

    url: Url
    payload: Any | UnsetType = UNSET
    headers: Headers | UnsetType = UNSET
    max_attempts: MaxAttempts | UnsetType | None = UNSET
    on_failure_url: Url | UnsetType = UNSET


class BatchItem(CreateTimer, kw_only=True, forbid_unknown_fields=True):
    """One timer of `POST /timers/batch`: a create body, and its own idempotency key."""

    idempotency_key: Annotated[str, Meta(pattern=r"^[\x21-\x7e]{1,255}$")] | UnsetType = UNSET


class ChangeTimer(_TimeFields, kw_only=True, forbid_unknown_fields=True):
    """What to change on a pending timer or series; at least one field."""

    url: Url | UnsetType = UNSET
    payload: Any | UnsetType = UNSET
    headers: Headers | UnsetType = UNSET
    on_failure_url: Url | UnsetType = UNSET


def field_names(model: type[Struct]) -> frozenset[str]:
    """The JSON names of a body model's fields: what a body of that kind may hold."""
    return frozenset(model.__struct_fields__)


# answers


class AttemptView(Struct, forbid_unknown_fields=True):
    """One delivery attempt."""

    attempt: Annotated[int, Meta(ge=1)]
    at: DateTime
    status: int | None
    error: str | None
    latency_ms: Annotated[float, Meta(ge=0)]
    response: str | None


class CallbackView(Struct, forbid_unknown_fields=True):
    """The failure callback of the latest failure."""

    state: Literal["pending", "firing", "delivered", "failed"]
    attempts: Count
    last_status: int | None
    last_error: str | None
    next_attempt_at: DateTime | None
    occurrence: Count | None


class ScheduleView(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A series' schedule, as created or last changed."""

    every: str | UnsetType = UNSET
    start_at: DateTime | UnsetType | None = UNSET
    cron: str | UnsetType = UNSET
    timezone: str | UnsetType = UNSET
    until: DateTime | UnsetType | None = UNSET
    max_occurrences: int | UnsetType | None = UNSET
    catch_up: CatchUp | UnsetType = UNSET


State = Literal["pending", "firing", "fired", "failed", "cancelled", "paused"]


class TimerView(Struct, forbid_unknown_fields=True):
    """A timer and its delivery state. The series fields are there only for a series."""

    id: TimerId
    time_left: Annotated[
        int, Meta(ge=0, description="Whole seconds until it fires, rounded up; 0 once due.")
    ]
    state: State
    fire_at: Annotated[DateTime, Meta(description="When it fires (next).")]
    url: str
    attempts: Count
    created_at: DateTime
    fired_at: DateTime | None
    last_status: int | None
    last_error: str | None
    next_attempt_at: DateTime | None
    max_attempts: MaxAttempts | None
    payload: Any
    headers: Headers
    history: Annotated[
        list[AttemptView],
        Meta(max_length=HISTORY_MAX, description="The newest attempts, oldest first."),
    ]
    recurring: bool
    schedule: ScheduleView | UnsetType = UNSET
    occurrence: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    occurrence_at: DateTime | UnsetType | None = UNSET
    occurrences: Count | UnsetType = UNSET
    occurrences_failed: Count | UnsetType = UNSET
    next_fire_at: DateTime | UnsetType | None = UNSET
    upcoming: Annotated[list[DateTime], Meta(max_length=5)] | UnsetType = UNSET
    on_failure_url: str | None = None
    callback: CallbackView | None = None


class TimerPage(Struct, forbid_unknown_fields=True):
    """One page of a listing, newest first."""

    timers: list[TimerView]
    next_cursor: TimerId | None


class ErrorObject(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """What went wrong: a `code` to match on, a `message` for people, and details by code."""

    code: str
    message: str
    field: str | UnsetType = UNSET
    fields: list[str] | UnsetType = UNSET
    state: str | UnsetType = UNSET
    request_id: str | UnsetType = UNSET
    limit: int | UnsetType = UNSET


class ErrorBody(Struct, forbid_unknown_fields=True):
    """The one shape of every error answer."""

    error: ErrorObject


class BatchResult(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """One item's outcome in a batch answer: its status as a single create would have
    answered it, with the timer (201) or the error object (4xx)."""

    status: int
    timer: TimerView | UnsetType = UNSET
    error: ErrorObject | UnsetType = UNSET
    replayed: bool = False


class BatchAnswer(Struct, forbid_unknown_fields=True):
    """`POST /timers/batch`'s answer: one result per item, in the items' order."""

    results: list[BatchResult]


_ENCODER = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """JSON bytes of an answer model (or any JSON-able value)."""
    return _ENCODER.encode(value)
