"""What the daemon logs of its deliveries: an attempt that did not deliver at info, one that
did only at debug, and how many of each came out in a `deliveries` line every minute and when
it stops (`timerd.firing`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tests.support.procs import TimerdProcesses
from tests.support.receiver import Receiver
from tests.test_daemon import START_MS, FakeClock, Recorder, add_timer, leading, run, settle
from timerd.models import State, Timer, new_timer_id
from timerd.store import open_store
from timerd.store.base import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:  # the daemon's loop is the same over any store
    s = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    yield s
    s.close()


def of(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def test_delivered_attempts_log_at_debug_the_others_at_info_and_a_summary_counts_all(
    store: Store,
) -> None:
    clock = FakeClock()
    recorder = Recorder(clock)
    delivered = {add_timer(store, START_MS) for _ in range(3)}
    retried = add_timer(store, START_MS + 1)  # answered 503 while attempts remain: retried
    gave_up = new_timer_id()  # answered 503 at its one attempt: failed
    store.insert(Timer(gave_up, "http://127.0.0.1:9/h", START_MS + 1, START_MS, max_attempts=1))

    logs: list[dict[str, Any]] = []

    async def scenario() -> None:
        with capture_logs() as captured:
            async with leading(store, clock, recorder) as daemon:
                await daemon.step()
                await settle(daemon)
                recorder.status = 503
                clock.advance(3)
                await daemon.step()
                await settle(daemon)
                daemon.log_summary()
                daemon.log_summary()  # nothing ended since: no line
        logs.extend(captured)

    run(scenario)
    lines = {entry["timer_id"]: entry for entry in of(logs, "delivery")}
    assert set(lines) == delivered | {retried, gave_up}
    assert {lines[i]["log_level"] for i in delivered} == {"debug"}
    assert (lines[retried]["log_level"], lines[retried]["outcome"]) == ("info", "pending")
    assert (lines[gave_up]["log_level"], lines[gave_up]["outcome"]) == ("info", "failed")
    [summary] = of(logs, "deliveries")
    assert summary["log_level"] == "info"
    assert (summary["delivered"], summary["retrying"], summary["failed"]) == (3, 1, 1)
    assert summary["late_ms_max"] == 2  # the 503s started 3 ms after START_MS, due at + 1
    assert store.get(gave_up).state is State.FAILED


def test_a_stopping_daemon_logs_its_summary_and_no_line_per_delivery(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'timerd.db'}"
    api = procs.start("api", store)
    daemon = procs.start("daemon", store, env={"TIMERD_POLL_INTERVAL_S": "0.5"})
    with Receiver() as receiver:
        for _ in range(5):
            created = httpx.post(
                f"{api.base_url}/timers", json={"seconds": 0.001, "url": receiver.url}
            )
            assert created.status_code == 201
        receiver.wait_for(5)
    assert daemon.stop() == 0
    logged = [json.loads(line) for line in daemon.stderr().splitlines() if line.startswith("{")]
    assert of(logged, "delivery") == []  # at info, the default: a delivered attempt is quiet
    # Every firing process logs its own summary as it stops; together they count all five.
    assert sum(entry["delivered"] for entry in of(logged, "deliveries")) == 5
