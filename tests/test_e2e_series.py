"""Recurring timers end to end: `timerd api` and `timerd daemon` processes on one SQLite file, a
series created and steered over HTTP, its occurrences received by a real loopback receiver.

Waiting is on the receiver or on answers; where a test must let time pass (a pause, a daemon
that is down), it waits for the clock to reach a moment, never for an arbitrary sleep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import now_ms, start_daemon, store_url
from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until


def body_of(arrival: Arrival) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(arrival.body)
    return decoded


def answered(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    decoded: dict[str, Any] = response.json()
    return decoded


def retried_while_firing(call: Any) -> dict[str, Any]:
    """Call until it is not refused because the occurrence is in flight (409), and return
    the answer: a series may be firing at the instant the request lands."""
    answer = wait_until(lambda: (r := call()).status_code != 409 and r, 10, "a non-409 answer")
    return answered(answer)


def wait_for_clock(at_ms: int) -> None:
    """Let time reach `at_ms` (the wall clock is what is waited for here)."""
    wait_until(lambda: now_ms() >= at_ms, (at_ms - now_ms()) / 1000 + 5, "the clock")


def test_an_every_second_series_fires_pauses_resumes_changes_and_ends(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    start_daemon(procs, db)
    with httpx.Client(base_url=api.base_url) as client, Receiver() as receiver:
        created = answered(client.post("/timers", json={"url": receiver.url, "every": "1s"}), 201)
        timer_id = created["id"]
        arrivals = receiver.wait_for(3, timeout_s=15)
        bodies = [body_of(a) for a in arrivals[:3]]
        assert [b["occurrence"] for b in bodies] == [1, 2, 3]
        assert [a.headers["webhook-id"] for a in arrivals[:3]] == [
            f"{timer_id}_{n}" for n in (1, 2, 3)
        ]
        start = bodies[0]["scheduled_at_ms"]
        assert [b["scheduled_at_ms"] for b in bodies] == [start, start + 1000, start + 2000]
        assert all(a.at_ms >= b["scheduled_at_ms"] for a, b in zip(arrivals, bodies, strict=False))

        paused = retried_while_firing(lambda: client.post(f"/timers/{timer_id}/pause"))
        assert (paused["state"], paused["next_fire_at"]) == ("paused", None)
        seen = len(receiver.arrivals)
        paused_ms = now_ms()
        wait_for_clock(paused_ms + 2500)
        assert len(receiver.arrivals) == seen, "fired while paused"

        resumed = answered(client.post(f"/timers/{timer_id}/resume"))
        assert resumed["state"] == "pending"
        after_resume = body_of(receiver.wait_for(seen + 1, timeout_s=10)[seen])
        assert after_resume["scheduled_at_ms"] >= paused_ms + 2500, "fired a missed occurrence"
        assert after_resume["missed"] == 0

        changed = retried_while_firing(
            lambda: client.patch(f"/timers/{timer_id}", json={"every": "2s"})
        )
        assert changed["schedule"]["every"] == "2s"
        upcoming = changed["upcoming"]
        assert len(upcoming) == 5
        seen = len(receiver.arrivals)
        later = [body_of(a) for a in receiver.wait_for(seen + 2, timeout_s=15)[seen : seen + 2]]
        assert later[1]["scheduled_at_ms"] - later[0]["scheduled_at_ms"] == 2000

        ended = retried_while_firing(lambda: client.delete(f"/timers/{timer_id}"))
        assert ended["state"] == "cancelled"
        seen = len(receiver.arrivals)
        wait_for_clock(now_ms() + 2500)
        assert len(receiver.arrivals) == seen, "fired after DELETE"
        view = answered(client.get(f"/timers/{timer_id}"))
    numbers = [body_of(a)["occurrence"] for a in receiver.arrivals]
    assert numbers == sorted(set(numbers)), "an occurrence was delivered twice or out of order"
    # A DELETE that lands while an occurrence is in flight ends the series without recording it.
    assert numbers[-1] - 1 <= view["occurrences"] <= numbers[-1]


def test_a_catch_up_fires_once_for_the_occurrences_missed_while_every_daemon_was_down(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    daemon = start_daemon(procs, db)
    with httpx.Client(base_url=api.base_url) as client, Receiver() as receiver:
        created = answered(client.post("/timers", json={"url": receiver.url, "every": "1s"}), 201)
        first = body_of(receiver.wait_for(1, timeout_s=15)[0])
        assert daemon.stop() == 0
        down = len(receiver.arrivals)
        last = body_of(receiver.arrivals[-1])
        # The next occurrence and three more come due while no daemon runs.
        wait_for_clock(last["scheduled_at_ms"] + 4500)
        assert len(receiver.arrivals) == down
        restarted_ms = now_ms()
        start_daemon(procs, db)
        arrivals = receiver.wait_for(down + 2, timeout_s=15)
    catch_up, after = body_of(arrivals[down]), body_of(arrivals[down + 1])
    assert catch_up["occurrence"] == last["occurrence"] + 1
    assert catch_up["missed"] >= 3
    assert after["occurrence"] == catch_up["occurrence"] + catch_up["missed"] + 1
    assert after["scheduled_at_ms"] > restarted_ms - 1000
    assert after["scheduled_at_ms"] == first["scheduled_at_ms"] + 1000 * (after["occurrence"] - 1)
    assert arrivals[down].headers["webhook-id"] == f"{created['id']}_{catch_up['occurrence']}"


def test_invalid_schedules_answer_422_naming_the_field_and_store_nothing(
    procs: TimerdProcesses, db: Path, request: pytest.FixtureRequest
) -> None:
    api: TimerdProcess = procs.start("api", store_url(db))
    client = httpx.Client(base_url=api.base_url)
    request.addfinalizer(client.close)
    url = "https://example.com/hooks"
    cases = {
        "every": {"every": "500ms"},
        "cron": {"cron": "61 * * * *"},
        "timezone": {"cron": "0 9 * * *", "timezone": "Mars/Base"},
        "until": {"every": "1s", "until": "2020-01-01T00:00:00Z"},
    }
    mixed = [
        ("cron", {"cron": "0 9 * * *", "fire_at": "2030-01-01T00:00:00Z"}),
        ("cron", {"cron": "0 9 * * *", "seconds": 5}),
        ("cron", {"cron": "0 0 30 2 *"}),
        ("start_at", {"seconds": 5, "start_at": "2030-01-01T00:00:00Z"}),
    ]
    for field, fields in [*cases.items(), *mixed]:
        answer = client.post("/timers", json={"url": url, **fields})
        assert answer.status_code == 422, (fields, answer.text)
        assert answer.json()["error"]["field"] == field, (fields, answer.text)
    assert answered(client.get("/timers"))["timers"] == []
