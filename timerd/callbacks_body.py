"""What a failure callback sends: its `webhook-id` and its `timer.failed` JSON body."""

from __future__ import annotations

import json
from typing import Any

from timerd.models import Timer, history_to_dicts


def callback_webhook_id(timer: Timer) -> str:
    """The `webhook-id` of a failure callback: `<id>_failed` for a one-off timer,
    `<id>_<n>_failed` for occurrence n of a series (the same across retries)."""
    if timer.recurring:
        return f"{timer.id}_{timer.callback_occurrence}_failed"
    return f"{timer.id}_failed"


def callback_body(timer: Timer) -> bytes:
    """The JSON body of `timer.failed`: which timer (and occurrence) failed, this callback's
    attempt, and the timer as it is now: its state, last status and error, and history."""
    body: dict[str, Any] = {
        "id": timer.id,
        "type": "timer.failed",
        "attempt": timer.callback_attempts,
        "timer": {
            "id": timer.id,
            "url": timer.url,
            "state": timer.state.value,
            "created_at_ms": timer.created_at_ms,
            "due_at_ms": timer.due_at_ms,
            "attempts": timer.attempts,
            "last_status": timer.last_status,
            "last_error": timer.last_error,
            "history": history_to_dicts(timer.history),
            "payload": None if timer.payload is None else json.loads(timer.payload),
        },
    }
    if timer.recurring:
        body["occurrence"] = timer.callback_occurrence
        body["timer"]["occurrences_failed"] = timer.occurrences_failed
    return json.dumps(body, separators=(",", ":")).encode()
