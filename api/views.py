"""How a timer looks in API answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from timerd.models import AttemptRecord, State, Timer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339(ms: int | None) -> str | None:
    """UTC epoch milliseconds as an RFC 3339 string with millisecond precision and a `Z`."""
    if ms is None:
        return None
    moment = EPOCH + timedelta(milliseconds=ms)  # exact, where ms / 1000 as a float is not
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timer_view(timer: Timer, now_ms: int) -> dict[str, Any]:
    """The JSON object of one timer: the seed's `id` and `time_left`, and the rest of its state."""
    return {
        "id": timer.id,
        "time_left": timer.time_left_s(now_ms),
        "state": timer.state.value,
        "fire_at": rfc3339(timer.due_at_ms),
        "url": timer.url,
        "attempts": timer.attempts,
        "created_at": rfc3339(timer.created_at_ms),
        "fired_at": rfc3339(timer.fired_at_ms),
        "last_status": timer.last_status,
        "last_error": timer.last_error,
        "next_attempt_at": rfc3339(timer.due_at_ms) if _retrying(timer) else None,
        "max_attempts": timer.max_attempts,
        "payload": None if timer.payload is None else json.loads(timer.payload),
        "headers": dict(timer.headers),
        "history": [attempt_view(record) for record in timer.history],
    }


def _retrying(timer: Timer) -> bool:
    return timer.state is State.PENDING and timer.attempts > 0


def attempt_view(record: AttemptRecord) -> dict[str, Any]:
    """One attempt of the history: when, what came back (status or error class), how fast."""
    return {
        "attempt": record.attempt,
        "at": rfc3339(record.at_ms),
        "status": record.status,
        "error": record.error,
        "latency_ms": record.latency_ms,
        "response": record.response,
    }
