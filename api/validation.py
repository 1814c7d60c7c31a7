"""Turning a request body into a due time and URL, or into a clear 4xx `ApiError`."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from api.contract import (
    BATCH_MAX,
    HEADER_NAME_PATTERN,
    HEADER_VALUE_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    MAX_ATTEMPTS_CAP,
    ChangeTimer,
    CreateTimer,
    field_names,
)
from api.errors import ApiError
from timerd.models import State, TimerChanges, is_timer_id
from timerd.schedules import ScheduleError, local_to_ms
from timerd.settings import Settings, default
from timerd.ssrf import PUBLIC_ONLY, AddressPolicy
from timerd.targets import origin_checks, origin_of

MAX_BODY_BYTES: int = default("max_body_bytes")
MAX_URL_CHARS: int = default("max_url_chars")
MAX_INT_DIGITS = 30  # far beyond any sane delay, far below Python's int-parsing limits
MAX_DUE_AT_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time RFC 3339 can write

DURATION_FIELDS = ("hours", "minutes", "seconds")
SECONDS_PER = {"hours": 3600, "minutes": 60, "seconds": 1}
SERIES_FIELDS = frozenset(
    {"every", "start_at", "cron", "timezone", "until", "max_occurrences", "catch_up"}
)  # checked by api/series.py
TIME_FIELDS = frozenset({*DURATION_FIELDS, "fire_at", "fire_at_local"})  # a one-off's time
CREATE_FIELDS = field_names(CreateTimer)  # what a create body may hold
MAX_PAYLOAD_BYTES: int = default("max_payload_bytes")
MAX_PAYLOAD_DEPTH = 100  # arrays and objects within one another: far from the recursion limit
MAX_HEADERS = 20
MAX_HEADER_BYTES: int = default("max_headers_bytes")  # names and values together
DEFAULT_PAGE, MAX_PAGE = 50, 100
URL_SCAN = 1000  # timers one page of a `url_prefix` listing looks at, at most
LIMIT = re.compile(r"[0-9]{1,9}")
# Headers a client may not set: hop-by-hop ones, framing, and what timerd itself sends.
FORBIDDEN_HEADER_NAMES = (
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "expect",
)  # in the order the OpenAPI document lists them
FORBIDDEN_HEADERS = frozenset(FORBIDDEN_HEADER_NAMES)
HEADER_NAME = re.compile(HEADER_NAME_PATTERN, re.ASCII)
HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN, re.ASCII)
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?", re.ASCII)
# What str.isspace() calls a space (sre's \s is the same test), and the C0 controls and DEL.
SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON \u escape can make but UTF-8 cannot


@dataclass(frozen=True, slots=True)
class Rules:
    """What a request may ask for; `from_settings` builds the operator's, once per app."""

    max_delay_s: float = 365 * 86_400.0
    policy: AddressPolicy = PUBLIC_ONLY  # which url hosts are allowed (TIMERD_ALLOWED_NETWORKS)
    max_url_chars: int = MAX_URL_CHARS
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            max_delay_s=settings.max_delay_s,
            policy=AddressPolicy.from_setting(settings.allowed_networks),
            max_url_chars=settings.max_url_chars,
            max_payload_bytes=settings.max_payload_bytes,
            max_header_bytes=settings.max_headers_bytes,
        )


DEFAULT_RULES = Rules()


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A valid create request: where to send the webhook and when, in UTC epoch milliseconds."""

    url: str
    due_at_ms: int
    payload: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    max_attempts: int | None = None
    on_failure_url: str | None = None  # where `timer.failed` goes when the timer fails


class _BadNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a number JSON allows")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON allows it, but it is no float, and Infinity
        raise _BadNumber("a number in the body is too large for a float")  # is not JSON
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadNumber("an integer in the body has too many digits")
    return int(text)


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` that raises ValueError for NaN and Infinity, numbers too large for a float
    and integers of more than MAX_INT_DIGITS digits: what cannot be answered or sent as JSON."""
    return json.loads(
        text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float
    )


_DECODER = msgspec.json.Decoder()
HUGE_INT = 10**MAX_INT_DIGITS  # the least integer of more than MAX_INT_DIGITS digits


def loads_fast(body: bytes) -> Any:
    """`loads_strict`, by msgspec's decoder where it can: what msgspec refuses (malformed JSON,
    `1e400`, NaN, lone surrogates, a byte-order mark) goes through `loads_strict`, which says
    why in our words or accepts it as `json.loads` would."""
    try:
        value = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return loads_strict(body)
    if _has_huge_int(value):
        raise _BadNumber("an integer in the body has too many digits")
    return value


def _has_huge_int(value: Any) -> bool:
    """Whether an integer of more than MAX_INT_DIGITS digits is anywhere in `value`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            if not -HUGE_INT < item < HUGE_INT:
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; 400 `invalid_json` for anything that is not JSON, and for numbers
    that are not finite floats or integers of at most MAX_INT_DIGITS digits, wherever they are."""
    try:
        return loads_fast(body)
    except _BadNumber as exc:
        raise ApiError(400, "invalid_json", str(exc)) from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object body (`parse_json`); 400 for anything that is not one."""
    return json_object(parse_json(body))


def json_object(data: Any) -> dict[str, Any]:
    """`data` if it is an object whose top-level names and strings are valid Unicode; else
    400 (a body, or an item of a batch)."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    # Only top-level names and strings are ever stored or echoed back; nothing deeper is.
    if any(LONE_SURROGATE.search(t) for t in (*data, *data.values()) if isinstance(t, str)):
        raise ApiError(400, "invalid_json", "the body has a \\u escape of a lone surrogate")
    return data


def parse_create(
    data: dict[str, Any],
    now_ms: int,
    rules: Rules = DEFAULT_RULES,
    *,
    due_at_ms: int | None = None,
) -> CreateRequest:
    """Validate a create body: `url` plus either a duration or `fire_at`; with `due_at_ms`
    (a series' first occurrence, from `api.series`), the body's time fields are not read."""
    _refuse_unknown(data, CREATE_FIELDS, "field")
    url = parse_url(data.get("url"), rules)
    if due_at_ms is None:
        due_at_ms = _due_at_ms(data, now_ms, rules.max_delay_s)
    return CreateRequest(
        url=url,
        due_at_ms=due_at_ms,
        payload=parse_payload(data["payload"], rules) if "payload" in data else None,
        headers=parse_headers(data.get("headers", {}), rules),
        max_attempts=parse_max_attempts(data.get("max_attempts")),
        on_failure_url=_on_failure_url(data, rules),
    )


def _on_failure_url(data: dict[str, Any], rules: Rules) -> str | None:
    """`on_failure_url`, checked as `url` is; None when absent."""
    if "on_failure_url" not in data:
        return None
    return parse_url(data["on_failure_url"], rules, "on_failure_url")


def _due_at_ms(data: dict[str, Any], now_ms: int, max_delay_s: float) -> int:
    """The due time a body asks for: `fire_at`, `fire_at_local` in `timezone`, or
    hours/minutes/seconds from now."""
    has_duration = any(name in data for name in DURATION_FIELDS)
    absolute = [name for name in ("fire_at", "fire_at_local") if name in data]
    if len(absolute) > 1 or (absolute and has_duration):
        raise _invalid(absolute[-1], "give one of fire_at, fire_at_local or a duration")
    if "timezone" in data and "fire_at_local" not in data:
        raise _invalid("timezone", "timezone goes with fire_at_local or cron")
    if "fire_at" in data:
        due_at_ms = max(now_ms, parse_fire_at(data["fire_at"]))
    elif "fire_at_local" in data:
        due_at_ms = max(now_ms, parse_fire_at_local(data["fire_at_local"], data.get("timezone")))
    else:
        due_at_ms = now_ms + parse_duration_ms(data)
    field = absolute[0] if absolute else _largest_duration_field(data)
    if due_at_ms - now_ms > max_delay_s * 1000:
        raise _invalid(field, f"the delay may be at most {max_delay_s:g} seconds")
    if due_at_ms > MAX_DUE_AT_MS:
        raise _invalid(field, "the timer must fire before the year 10000")
    return due_at_ms


def parse_payload(value: Any, rules: Rules = DEFAULT_RULES) -> str:
    """Any JSON value, kept as compact JSON text of at most `rules.max_payload_bytes`."""
    if _nesting(value) > MAX_PAYLOAD_DEPTH:  # json.dumps, here or later, would recurse too deep
        raise _invalid("payload", f"payload may nest at most {MAX_PAYLOAD_DEPTH} levels deep")
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:  # a \u escape of a lone surrogate somewhere inside
        raise _invalid("payload", "payload holds a string that is not valid Unicode") from exc
    if size > rules.max_payload_bytes:
        limit = rules.max_payload_bytes
        raise _invalid("payload", f"payload may be at most {limit} bytes as JSON")
    return text


def _nesting(value: Any) -> int:
    """How many arrays and objects `value` nests within one another (a scalar: 0), found
    level by level rather than by recursion."""
    depth, level = 0, [value]
    while True:
        containers = [item for item in level if isinstance(item, list | dict)]
        if not containers:
            return depth
        depth += 1
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]


def parse_headers(value: Any, rules: Rules = DEFAULT_RULES) -> tuple[tuple[str, str], ...]:
    """An object of extra request headers: names lower-cased, none of the forbidden ones."""
    if not isinstance(value, dict):
        raise _invalid("headers", "headers must be an object of header names to string values")
    if len(value) > MAX_HEADERS:
        raise _invalid("headers", f"at most {MAX_HEADERS} headers")
    pairs = []
    for name, text in value.items():
        if not HEADER_NAME.fullmatch(name):
            raise _invalid("headers", f"{name!r} is not a valid header name")
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS or lowered.startswith("webhook-"):
            raise _invalid("headers", f"the header {lowered} cannot be set")
        if not isinstance(text, str) or not HEADER_VALUE.fullmatch(text):
            raise _invalid("headers", f"the value of {lowered} must be printable ASCII text")
        pairs.append((lowered, text))
    if len({name for name, _ in pairs}) < len(pairs):
        raise _invalid("headers", "a header is given twice")
    if sum(len(n) + len(v) for n, v in pairs) > rules.max_header_bytes:
        limit = rules.max_header_bytes
        raise _invalid("headers", f"headers may be at most {limit} bytes in all")
    return tuple(pairs)


def parse_max_attempts(value: Any) -> int | None:
    """How many attempts the timer gets, 1 to MAX_ATTEMPTS_CAP; None for the schedule's."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS_CAP:
        raise _invalid(
            "max_attempts", f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS_CAP}"
        )
    return value


def _largest_duration_field(data: dict[str, Any]) -> str:
    return max(DURATION_FIELDS, key=lambda name: data.get(name, 0) * SECONDS_PER[name])


def parse_duration_ms(data: dict[str, Any]) -> int:
    """The total of hours, minutes and seconds in whole milliseconds (each defaults to 0)."""
    total_s = 0.0
    for name in DURATION_FIELDS:
        value = data.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, f"{name} must be a number")
        if not math.isfinite(value) or value < 0:
            raise _invalid(name, f"{name} must be a finite number, zero or more")
        total_s += float(value) * SECONDS_PER[name]  # float: bounded, cannot overflow to an error
        if not math.isfinite(total_s * 1000):  # finite seconds can still overflow as milliseconds
            raise _invalid(name, "the delay is too long")
    total_ms = round(total_s * 1000)
    if total_ms <= 0:
        raise _invalid("seconds", "the delay must be at least one millisecond")
    return total_ms


def parse_fire_at(value: Any) -> int:
    """An RFC 3339 time with an offset, as UTC epoch milliseconds."""
    return parse_rfc3339(value, "fire_at")


def parse_fire_at_local(value: Any, timezone: Any) -> int:
    """A wall-clock time without an offset in the IANA zone `timezone`, as UTC epoch
    milliseconds: a time skipped by a spring-forward moves to the instant of the jump, a time
    that happens twice is the first (see `timerd.schedules.local_to_ms`)."""
    if not isinstance(value, str) or not LOCAL_TIME.fullmatch(value):
        raise _invalid(
            "fire_at_local",
            "fire_at_local must be a local time without an offset, like 2026-12-24T09:00:00",
        )
    if timezone is None:
        raise _invalid("timezone", "fire_at_local needs a timezone, like Europe/Berlin")
    if not isinstance(timezone, str) or not timezone.strip() or len(timezone) > 200:
        raise _invalid("timezone", "timezone must be an IANA time zone name")
    try:
        return local_to_ms(datetime.fromisoformat(value.upper()), timezone.strip())
    except ScheduleError as exc:
        raise _invalid(exc.field, str(exc)) from exc
    except (OverflowError, ValueError) as exc:  # 2026-02-31, a 25:00 hour
        raise _invalid("fire_at_local", "fire_at_local is not a valid time") from exc


def parse_rfc3339(value: Any, field: str) -> int:
    """An RFC 3339 time with an offset in `field`, as UTC epoch milliseconds."""
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise _invalid(
            field, f"{field} must be an RFC 3339 time with an offset, like 2030-01-01T12:00:00Z"
        )
    try:
        moment = datetime.fromisoformat(value.upper())
        return round(moment.timestamp() * 1000)
    except (OverflowError, ValueError) as exc:  # 2030-02-31, a 25:00 hour, year 0
        raise _invalid(field, f"{field} is not a valid time") from exc


def parse_url(value: Any, rules: Rules = DEFAULT_RULES, field: str = "url") -> str:
    """An absolute http(s) URL with a host, no user-info, no fragment, no spaces, a host that
    delivery can encode and look up (`timerd.targets`), and no host that `policy` denies without
    resolving it: a loopback name or a denied address literal in any textual form. Host names
    are not resolved here; delivery checks what they resolve to. `field` names the field in
    errors (`url`, `on_failure_url`)."""
    if value is None:
        raise _invalid(field, f"{field} is required")
    if not isinstance(value, str):
        raise _invalid(field, f"{field} must be a string")
    if len(value) > rules.max_url_chars:
        raise _invalid(field, f"{field} may be at most {rules.max_url_chars} characters")
    if SPACE_OR_CONTROL.search(value) is not None:
        raise _invalid(field, f"{field} must not contain spaces or control characters")
    origin = origin_of(value)
    problem, port_zero = authority_problem(origin)
    if problem is not None:
        raise _invalid(field, f"{field} {problem}")
    if "#" in value:
        raise _invalid(field, f"{field} must not contain a fragment")
    if port_zero:
        raise _invalid(field, f"{field} has an invalid port")
    denial, problem = origin_checks(origin, rules.policy)
    if denial is not None:
        raise _invalid(field, f"{field}'s host {denial}: webhooks may only reach public addresses")
    if problem is not None:
        raise _invalid(field, f"{field} {problem}: no webhook could ever be delivered to it")
    return value


@functools.lru_cache(maxsize=4096)
def authority_problem(url: str) -> tuple[str | None, bool]:
    """What `parse_url` finds wrong in a URL's scheme and authority (the first of: unreadable,
    not http(s), no host, user info), and whether its port is 0. Its origin alone decides both
    (`timerd.targets.origin_of`), so they are kept for the origins seen last."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL", False
    if parts.scheme not in {"http", "https"}:
        return "must be an absolute http or https URL", False
    if not parts.hostname:
        return "must have a host", False
    if "@" in parts.netloc:
        return "must not contain user info", False
    return None, port == 0


def _refuse_unknown(given: Iterable[str], allowed: Set[str], noun: str) -> None:
    """422 `unknown_field` naming every name outside `allowed`, so a typo never passes."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ApiError(
            422, "unknown_field", f"unknown {noun}(s): {', '.join(unknown)}", fields=unknown
        )


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field=field)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A valid listing request."""

    state: State | None
    cursor: str | None
    limit: int
    recurring: bool | None = None
    url_prefix: str | None = None


URL_PREFIX = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_URL_CHARS}}}")


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """`state` (optional), `cursor` (the `next_cursor` of the previous page), `limit` (1-100),
    `recurring` (optional: `true` lists series only, `false` one-off timers only), `url_prefix`
    (optional: only timers whose URL starts with it)."""
    _refuse_unknown(params, {"state", "cursor", "limit", "recurring", "url_prefix"}, "parameter")
    recurring = params.get("recurring")
    if recurring is not None and recurring not in {"true", "false"}:
        raise _invalid("recurring", "recurring must be true or false")
    url_prefix = params.get("url_prefix")
    if url_prefix is not None and not URL_PREFIX.fullmatch(url_prefix):
        message = f"url_prefix must be 1 to {MAX_URL_CHARS} characters without control characters"
        raise _invalid("url_prefix", message)
    state = params.get("state")
    if state is not None and state not in {s.value for s in State}:
        raise _invalid("state", f"state must be one of {', '.join(s.value for s in State)}")
    cursor = params.get("cursor")
    if cursor is not None and not is_timer_id(cursor):
        raise _invalid("cursor", "cursor must be the next_cursor of a previous page")
    limit = params.get("limit", str(DEFAULT_PAGE))
    # ASCII digits ("²".isdigit() holds, int("²") fails), few enough for int() (4300 at most)
    if not LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_PAGE:
        raise _invalid("limit", f"limit must be an integer from 1 to {MAX_PAGE}")
    return ListQuery(
        None if state is None else State(state),
        cursor,
        int(limit),
        None if recurring is None else recurring == "true",
        url_prefix,
    )


IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN, re.ASCII)
CHANGE_FIELDS = field_names(ChangeTimer)  # what a PATCH body may hold


def parse_idempotency_key(value: Any, name: str = "Idempotency-Key") -> str | None:
    """The `Idempotency-Key` header (or a batch item's `idempotency_key`): 1 to 255 visible
    ASCII characters, or absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not IDEMPOTENCY_KEY.fullmatch(value):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{name} must be 1 to 255 visible ASCII characters",
        )
    return value


def parse_batch(body: bytes) -> list[Any]:
    """A batch body: a JSON array of 1 to BATCH_MAX items (each checked as a create body by
    the caller). 400 for what is not JSON or not an array, 413 for more than BATCH_MAX items."""
    items = parse_json(body)
    if not isinstance(items, list):
        raise ApiError(400, "invalid_body", "the body must be a JSON array of timers")
    if not items:
        raise ApiError(422, "invalid_body", "give at least one timer")
    if len(items) > BATCH_MAX:
        raise ApiError(
            413, "too_many_timers", f"a batch may hold at most {BATCH_MAX} timers", limit=BATCH_MAX
        )
    return items


def request_hash(data: dict[str, Any]) -> str:
    """A digest of a create body, the same for the same JSON whatever its key order."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def parse_changes(
    data: dict[str, Any],
    now_ms: int,
    rules: Rules = DEFAULT_RULES,
    *,
    schedule: tuple[str, int] | None = None,
) -> TimerChanges:
    """A PATCH body: any of a new due time (a duration from now, or `fire_at`), `url`,
    `payload`, `headers`, `on_failure_url`; at least one. `schedule` is a series' new schedule
    (JSON text) and first occurrence, from `api.series`: its fields are not read here."""
    _refuse_unknown(data, CHANGE_FIELDS, "field")
    if not data:
        raise ApiError(422, "invalid_body", "give at least one field to change")
    if schedule is not None:
        return TimerChanges(
            due_at_ms=schedule[1],
            schedule=schedule[0],
            url=parse_url(data["url"], rules) if "url" in data else None,
            payload=parse_payload(data["payload"], rules) if "payload" in data else None,
            headers=parse_headers(data["headers"], rules) if "headers" in data else None,
            on_failure_url=_on_failure_url(data, rules),
        )
    has_time = bool(TIME_FIELDS & set(data)) or "timezone" in data
    return TimerChanges(
        due_at_ms=_due_at_ms(data, now_ms, rules.max_delay_s) if has_time else None,
        url=parse_url(data["url"], rules) if "url" in data else None,
        payload=parse_payload(data["payload"], rules) if "payload" in data else None,
        headers=parse_headers(data["headers"], rules) if "headers" in data else None,
        on_failure_url=_on_failure_url(data, rules),
    )
