"""Timers for tests: one ready to deliver, and putting a stored timer in a given state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from timerd.models import Claim, Outcome, State, Timer, new_timer_id
from timerd.store.sqlite import SqliteStore


def timer_for(url: str, **fields: Any) -> Timer:
    """A claimed timer (first attempt) as the daemon hands it to delivery."""
    return Timer(
        id=new_timer_id(),
        url=url,
        due_at_ms=1_800_000_000_000,
        created_at_ms=1_799_999_999_000,
        attempts=1,
        claim_token="test",
        **fields,
    )


def put_in_state(db: Path, timer_id: str, outcome: State | None) -> None:
    """Claim the timer in the SQLite file as a daemon would and, unless `outcome` is None,
    record that outcome (FIRED with a 200, anything else with a 410)."""
    now_ms = time.time_ns() // 1_000_000
    store = SqliteStore(str(db))
    try:
        claim = Claim("test", now_ms=now_ms + 10**9, until_ms=now_ms + 10**10, token="test")
        assert [t.id for t in store.claim_due([timer_id], claim)] == [timer_id]
        if outcome is not None:
            status = 200 if outcome is State.FIRED else 410
            result = Outcome(timer_id, "test", outcome, at_ms=now_ms, status=status)
            assert store.complete([result]) == 1
    finally:
        store.close()
