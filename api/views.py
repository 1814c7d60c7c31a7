"""How a timer looks in API answers: the `api.contract` models, built from a `Timer`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from msgspec import UNSET

from api.contract import AttemptView, CallbackView, ScheduleView, TimerView
from api.series import every_text
from api.validation import loads_strict
from timerd.models import AttemptRecord, CallbackState, State, Timer
from timerd.schedules import Schedule, parse_stored

log = structlog.get_logger("timerd.api")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339(ms: int | None) -> str | None:
    """UTC epoch milliseconds as an RFC 3339 string with millisecond precision and a `Z`."""
    if ms is None:
        return None
    moment = EPOCH + timedelta(milliseconds=ms)  # exact, where ms / 1000 as a float is not
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timer_view(timer: Timer, now_ms: int) -> TimerView:
    """One timer as answered: the seed's `id` and `time_left`, and the rest of its state."""
    series = series_view(timer) if timer.recurring else {}
    return TimerView(
        id=timer.id,
        time_left=timer.time_left_s(now_ms),
        state=timer.state.value,
        fire_at=rfc3339_ms(timer.due_at_ms),
        url=timer.url,
        attempts=timer.attempts,
        created_at=rfc3339_ms(timer.created_at_ms),
        fired_at=rfc3339(timer.fired_at_ms),
        last_status=timer.last_status,
        last_error=timer.last_error,
        next_attempt_at=rfc3339(timer.due_at_ms) if _retrying(timer) else None,
        max_attempts=timer.max_attempts,
        payload=payload_view(timer.payload, timer.id),
        headers=dict(timer.headers),
        history=[attempt_view(record) for record in timer.history],
        recurring=timer.recurring,
        **series,
        on_failure_url=timer.on_failure_url,
        callback=callback_view(timer),
    )


def rfc3339_ms(ms: int) -> str:
    """`rfc3339` of a time that is always there."""
    text = rfc3339(ms)
    assert text is not None
    return text


def callback_view(timer: Timer) -> CallbackView | None:
    """The failure callback of the timer's latest failure (None before any): its state,
    attempts, last status or error, the next attempt's time while pending, and the occurrence
    it reports for a series."""
    if timer.callback_state is None:
        return None
    pending = timer.callback_state is CallbackState.PENDING
    return CallbackView(
        state=timer.callback_state.value,
        attempts=timer.callback_attempts,
        last_status=timer.callback_status,
        last_error=timer.callback_error,
        next_attempt_at=rfc3339(timer.callback_due_at_ms) if pending else None,
        occurrence=timer.callback_occurrence if timer.recurring else None,
    )


UPCOMING = 5  # occurrence times a series' view lists


def series_view(timer: Timer) -> dict[str, Any]:
    """What a series adds to its view: its schedule, the current occurrence and how many have
    ended (and failed), when it fires next, and its next UPCOMING occurrence times."""
    assert timer.schedule is not None
    schedule = parse_stored(timer.schedule)
    live = timer.state in {State.PENDING, State.FIRING}
    finished = timer.state in {State.FIRED, State.FAILED}  # its last occurrence ended too
    ended = timer.occurrence - (0 if finished else 1)
    upcoming: list[int] = []
    if live and timer.occurrence_at_ms is not None:
        upcoming = schedule.upcoming(timer.occurrence, timer.occurrence_at_ms, UPCOMING)
    return {
        "schedule": schedule_view(schedule),
        "occurrence": timer.occurrence,
        "occurrence_at": rfc3339(timer.occurrence_at_ms),
        "occurrences": max(0, ended),
        "occurrences_failed": timer.occurrences_failed,
        "next_fire_at": rfc3339(timer.due_at_ms) if timer.state is State.PENDING else None,
        "upcoming": [rfc3339_ms(at_ms) for at_ms in upcoming],
    }


def schedule_view(schedule: Schedule) -> ScheduleView:
    """A schedule as the create body writes it."""
    view = ScheduleView(
        until=rfc3339(schedule.until_ms),
        max_occurrences=schedule.max_occurrences,
        catch_up=schedule.catch_up,
    )
    if schedule.every_ms is not None:
        view.every = every_text(schedule.every_ms)
        view.start_at = rfc3339(schedule.start_at_ms)
    else:
        view.cron = schedule.cron if schedule.cron is not None else UNSET
        view.timezone = schedule.timezone
    return view


def payload_view(text: str | None, timer_id: str = "") -> Any:
    """A stored payload as the JSON value it is. One that cannot be answered as JSON (stored
    before numbers were checked, or written to the store by other means) is shown as its text,
    so that no stored timer can make a read or a listing fail."""
    if text is None:
        return None
    try:
        value = loads_strict(text)
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()  # as the answer will
    except (ValueError, RecursionError):  # UnicodeEncodeError (a lone surrogate) among them
        log.warning("unreadable_payload", timer_id=timer_id, length=len(text))
        return text.encode("utf-8", "replace").decode()
    return value


def _retrying(timer: Timer) -> bool:
    return timer.state is State.PENDING and timer.attempts > 0


def attempt_view(record: AttemptRecord) -> AttemptView:
    """One attempt of the history: when, what came back (status or error class), how fast."""
    return AttemptView(
        attempt=record.attempt,
        at=rfc3339_ms(record.at_ms),
        status=record.status,
        error=record.error,
        latency_ms=record.latency_ms,
        response=record.response,
    )
