"""The schedule fields of a recurring timer, in create and PATCH bodies, as a `Schedule` or a
clear 422 naming the field at fault."""

from __future__ import annotations

import dataclasses
from typing import Any

from api.errors import ApiError
from api.validation import MAX_DUE_AT_MS, SERIES_FIELDS, TIME_FIELDS, Rules, parse_rfc3339
from timerd.durations import parse_duration_s
from timerd.errors import ConfigError
from timerd.schedules import (
    CATCH_UPS,
    MIN_EVERY_MS,
    Schedule,
    ScheduleError,
    cron_trigger,
    parse_stored,
)

MAX_OCCURRENCES_CAP = 1_000_000_000
UNITS_MS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field=field)


def is_series_request(data: dict[str, Any]) -> bool:
    """Whether a body asks for a series (`every` or `cron`)."""
    return "every" in data or "cron" in data


def parse_schedule(data: dict[str, Any], now_ms: int, rules: Rules) -> tuple[Schedule, int]:
    """A create body's schedule and its first occurrence (at or after `now_ms`). `every` (at
    least 1 s, `start_at` defaulting to now + the interval) or `cron` (with `timezone`), not
    both, and neither with `fire_at` or a delay."""
    _refuse_mixing(data)
    schedule = _apply(Schedule(), data, now_ms, rules)
    return schedule, first_occurrence(schedule, now_ms, rules)


def refuse_series_fields(data: dict[str, Any]) -> None:
    """422 for schedule fields in a body that asks for no series (no `every`, no `cron`);
    `timezone` is left to `fire_at_local`."""
    stray = sorted((SERIES_FIELDS - {"every", "cron", "timezone"}) & set(data))
    if stray:
        raise _invalid(stray[0], f"{stray[0]} belongs to a series: give every or cron too")


def change_schedule(
    stored: str, data: dict[str, Any], now_ms: int, rules: Rules
) -> tuple[Schedule, int]:
    """A PATCH body's changes to a series' schedule `stored`: `every` or `cron` replaces the
    kind of schedule, the other fields change only themselves. Returns the new schedule and
    the first occurrence at or after `now_ms`, where the series carries on."""
    _refuse_mixing(data)
    schedule = parse_stored(stored)
    if "every" in data:
        schedule = dataclasses.replace(schedule, cron=None, timezone="UTC", start_at_ms=None)
    if "cron" in data:
        schedule = dataclasses.replace(schedule, every_ms=None, start_at_ms=None)
    schedule = _apply(schedule, data, now_ms, rules)
    return schedule, first_occurrence(schedule, now_ms, rules)


def _refuse_mixing(data: dict[str, Any]) -> None:
    if "every" in data and "cron" in data:
        raise _invalid("cron", "give either every or cron, not both")
    kind = "cron" if "cron" in data else "every"
    for other in sorted(TIME_FIELDS):
        if other in data:
            raise _invalid(
                kind, f"a series is timed by its schedule: {kind} cannot go with {other}"
            )


def _apply(schedule: Schedule, data: dict[str, Any], now_ms: int, rules: Rules) -> Schedule:
    """`schedule` with the fields `data` gives, each checked."""
    changes: dict[str, Any] = {}
    if "every" in data:
        changes["every_ms"] = _every_ms(data["every"], rules)
    if "cron" in data:
        changes["cron"] = _text(data["cron"], "cron")
    if "timezone" in data:
        changes["timezone"] = _text(data["timezone"], "timezone")
    if "start_at" in data:
        changes["start_at_ms"] = parse_rfc3339(data["start_at"], "start_at")
    if "until" in data:
        changes["until_ms"] = (
            None if data["until"] is None else parse_rfc3339(data["until"], "until")
        )
    if "max_occurrences" in data:
        changes["max_occurrences"] = _max_occurrences(data["max_occurrences"])
    if "catch_up" in data:
        if data["catch_up"] not in CATCH_UPS:
            raise _invalid("catch_up", f"catch_up must be one of {', '.join(CATCH_UPS)}")
        changes["catch_up"] = data["catch_up"]
    schedule = dataclasses.replace(schedule, **changes)
    return _complete(schedule, data, now_ms)


def _complete(schedule: Schedule, data: dict[str, Any], now_ms: int) -> Schedule:
    """Check what only the whole schedule can tell, and default an interval's start."""
    if schedule.every_ms is not None:
        if "timezone" in data:
            raise _invalid("timezone", "timezone goes with cron (an interval is the same anywhere)")
        if schedule.start_at_ms is None:
            schedule = dataclasses.replace(schedule, start_at_ms=now_ms + schedule.every_ms)
        return schedule
    if schedule.cron is None:
        raise _invalid("every", "a series needs every or cron")
    if "start_at" in data:
        raise _invalid("start_at", "start_at goes with every; a cron schedule starts now")
    try:
        cron_trigger(schedule.cron, schedule.timezone)
    except ScheduleError as exc:
        raise _invalid(exc.field, str(exc)) from exc
    return schedule


def first_occurrence(schedule: Schedule, now_ms: int, rules: Rules) -> int:
    """The first occurrence at or after `now_ms`; 422 when there is none, it is past `until`
    or the maximum, or it is further away than the longest delay allowed."""
    first = schedule.first_from(now_ms)
    field = "every" if schedule.every_ms is not None else "cron"
    if first is None or first > MAX_DUE_AT_MS:
        raise _invalid(field, "the schedule has no future occurrence")
    if not schedule.allows(1, first):
        bound = "until" if schedule.until_ms is not None else "max_occurrences"
        raise _invalid(bound, f"the schedule has no occurrence left before its {bound}")
    if first - now_ms > rules.max_delay_s * 1000:
        raise _invalid(
            "start_at" if schedule.every_ms is not None else "cron",
            f"the first occurrence may be at most {rules.max_delay_s:g} seconds away",
        )
    return first


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise _invalid(field, f"{field} must be a non-empty string")
    return value.strip()


def _every_ms(value: Any, rules: Rules) -> int:
    if not isinstance(value, str):
        raise _invalid("every", "every must be a duration such as 30s, 15m, 2h or 1d")
    try:
        every_ms = round(parse_duration_s(value, "every") * 1000)
    except ConfigError as exc:
        raise _invalid("every", str(exc)) from exc
    if every_ms < MIN_EVERY_MS:
        raise _invalid("every", "every must be at least 1s")
    if every_ms > rules.max_delay_s * 1000:
        raise _invalid("every", f"every may be at most {rules.max_delay_s:g} seconds")
    return every_ms


def _max_occurrences(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("max_occurrences", "max_occurrences must be an integer")
    if not 1 <= value <= MAX_OCCURRENCES_CAP:
        raise _invalid("max_occurrences", f"max_occurrences must be 1 to {MAX_OCCURRENCES_CAP}")
    return value


def every_text(every_ms: int) -> str:
    """An interval as the largest whole unit that writes it: `90s` → "90s", `2h` → "2h"."""
    for unit, size in UNITS_MS:
        if every_ms % size == 0:
            return f"{every_ms // size}{unit}"
    return f"{every_ms}ms"
