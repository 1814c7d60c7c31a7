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

# What `api.validation.RFC3339` accepts: RFC 3339 with an offset, at most 6 fraction digits.
FIRE_AT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)

DateTime = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
TimerId = Annotated[str, Meta(pattern=TIMER_ID_PATTERN)]
Count = Annotated[int, Meta(ge=0)]


def _delay(unit: str) -> Meta:
    return Meta(
        ge=0,
        description=f"{unit} from now; a non-negative integer or decimal, kept to the "
        "millisecond; 0 when left out.",
    )


def _time(description: str) -> Meta:
    """An RFC 3339 time with an offset, as `fire_at`, `start_at` and `until` take one."""
    return Meta(
        pattern=FIRE_AT_PATTERN,
        extra_json_schema={"format": "date-time"},
        description=description,
        examples=["2030-01-01T12:00:00Z"],
    )


def _text(description: str, example: str) -> Meta:
    return Meta(description=description, examples=[example])


# The request fields, described once: the OpenAPI document takes them from these models (and
# the limits in force from the live settings, see `api.openapi`).
Hours = Annotated[float, _delay("Hours")]
Minutes = Annotated[float, _delay("Minutes")]
Seconds = Annotated[float, _delay("Seconds")]
FireAt = Annotated[
    str,
    _time(
        "An absolute RFC 3339 time with an offset (`2030-01-01T12:00:00Z`, "
        "`2030-01-01T14:00:00.250+02:00`), at most 6 fraction digits. A time in the past fires now."
    ),
]
FireAtLocal = Annotated[
    str,
    _text(
        "A wall-clock time without an offset (`2026-12-24T09:00:00`) in `timezone` (required with "
        "it). A time that does not exist there (skipped when clocks spring forward) fires at the "
        "first valid instant, the moment of the jump (02:30 → 03:00); a time that happens twice "
        "(clocks falling back) fires at its first occurrence. Not with `fire_at` or a duration.",
        "2026-12-24T09:00:00",
    ),
]
Every = Annotated[
    str,
    _text(
        "Repeat at this interval (`ms`, `s`, `m`, `h`, `d`: `1s`, `15m`, `1.5h`), at least 1 s and "
        "at most `TIMERD_MAX_DELAY_S`. Not with `cron`.",
        "15m",
    ),
]
StartAt = Annotated[
    str,
    _time(
        "With `every`: the first occurrence (later ones follow at exact multiples of the "
        "interval); default now + the interval."
    ),
]
Cron = Annotated[
    str,
    _text(
        "Repeat on a five-field crontab expression (minute hour day month weekday; `*/N`, ranges, "
        "lists, month and day names; weekday 0 and 7 are Sunday), computed by APScheduler's "
        "`CronTrigger` in `timezone`. Across daylight saving, a local time that does not "
        "exist fires at the same time after the jump (02:30 → 03:30), and one that happens "
        "twice fires at both. Not with `every`.",
        "0 9 * * MON-FRI",
    ),
]
Timezone = Annotated[
    str,
    _text("The IANA time zone of `cron` (default `UTC`) or of `fire_at_local`.", "Europe/Berlin"),
]
Until = Annotated[str, _time("No occurrence of the series after this time.")]
MaxOccurrences = Annotated[
    int, Meta(ge=1, le=1_000_000_000, description="The series ends after this many occurrences.")
]
CatchUp = Literal["once", "all"]
CatchUpField = Annotated[
    CatchUp,
    Meta(
        description="When occurrences were missed (every daemon down): `once` (default) fires "
        "one delivery for all of them, its body's `missed` counting the ones it stands for, "
        "then carries on at the next future occurrence; `all` fires each one."
    ),
]
_URL_RULES = (
    "An absolute `http` or `https` URL with a host, without user-info, a fragment, spaces or "
    "control characters. A host that is a loopback name or a literal non-public address is "
    "refused (422) unless `TIMERD_ALLOWED_NETWORKS` allows it; host names are not resolved "
    "here."
)
Url = Annotated[
    str,
    Meta(
        extra_json_schema={"format": "uri"},
        description=f"{_URL_RULES} The webhook goes to the URL with `/<id>` appended to its path.",
        examples=["https://example.com/hooks"],
    ),
]
OnFailureUrl = Annotated[
    str,
    Meta(
        extra_json_schema={"format": "uri"},
        description="Where a signed `timer.failed` POST goes when the timer, or an occurrence "
        "of a series, ends `failed`: the same rules as `url` (checked the same way here, the "
        "same SSRF guard, signing, retry schedule and per-host limit on delivery), with `/<id>` "
        "appended. Its body holds `id`, `type`, `attempt`, `occurrence` (a series) and `timer` "
        "(its state, last status and error, history); its `webhook-id` is `<id>_failed`, or "
        "`<id>_<occurrence>_failed`. Its delivery shows as `callback` on the timer.",
        examples=["https://example.com/failures"],
    ),
]
MaxAttempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_CAP)]
MaxAttemptsField = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_ATTEMPTS_CAP,
        description="Attempts for this timer instead of the retry schedule's; null or left "
        "out: the schedule's. A JSON integer (`3`, not `3.0`).",
    ),
]
Headers = dict[str, str]  # described with the limits in force (`api.openapi`)
Payload = Any  # likewise


class _TimeFields(Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields that say when a timer fires (a one-off) or on what schedule (a series)."""

    hours: Hours | UnsetType = UNSET
    minutes: Minutes | UnsetType = UNSET
    seconds: Seconds | UnsetType = UNSET
    fire_at: FireAt | UnsetType = UNSET
    fire_at_local: FireAtLocal | UnsetType = UNSET
    every: Every | UnsetType = UNSET
    start_at: StartAt | UnsetType = UNSET
    cron: Cron | UnsetType = UNSET
    timezone: Timezone | UnsetType = UNSET
    until: Until | UnsetType | None = UNSET
    max_occurrences: MaxOccurrences | UnsetType | None = UNSET
    catch_up: CatchUpField | UnsetType = UNSET


class CreateTimer(_TimeFields, kw_only=True, forbid_unknown_fields=True):
    """A webhook `url` and when to call it (see `api.openapi` for the rules across fields)."""

    url: Url
    payload: Payload | UnsetType = UNSET
    headers: Headers | UnsetType = UNSET
    max_attempts: MaxAttemptsField | UnsetType | None = UNSET
    on_failure_url: OnFailureUrl | UnsetType = UNSET


class BatchItem(CreateTimer, kw_only=True, forbid_unknown_fields=True):
    """One timer of `POST /timers/batch`: a create body, and its own idempotency key."""

    idempotency_key: Annotated[str, Meta(pattern=r"^[\x21-\x7e]{1,255}$")] | UnsetType = UNSET


class ChangeTimer(_TimeFields, kw_only=True, forbid_unknown_fields=True):
    """What to change on a pending timer or series; at least one field."""

    url: Url | UnsetType = UNSET
    payload: Payload | UnsetType = UNSET
    headers: Headers | UnsetType = UNSET
    on_failure_url: OnFailureUrl | UnsetType = UNSET


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
