"""Failure callbacks and series under crashes, end to end: `timerd api` and `timerd daemon`
processes on one SQLite file, real loopback receivers, signatures checked with the
`standardwebhooks` package. Waiting is on receivers or on answers, never on a sleep."""

from __future__ import annotations

import base64
import itertools
import json
import os
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from tests.support.cluster import start_daemon, store_url
from tests.support.procs import TimerdProcesses
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


def body_of(arrival: Arrival) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(arrival.body)
    return decoded


def created(client: httpx.Client, body: dict[str, Any]) -> str:
    answer = client.post("/timers", json=body)
    assert answer.status_code == 201, answer.text
    timer_id: str = answer.json()["id"]
    return timer_id


def callback_delivered(client: httpx.Client, timer_id: str) -> dict[str, Any]:
    """The timer's view once its failure callback is recorded delivered (15 s at most)."""

    def view() -> dict[str, Any] | None:
        timer: dict[str, Any] = client.get(f"/timers/{timer_id}").json()
        return timer if timer["callback"]["state"] == "delivered" else None

    found: dict[str, Any] = wait_until(view, 15, "the callback to be recorded delivered")
    return found


def test_a_permanent_410_sends_a_signed_failure_callback_retried_until_delivered(
    procs: TimerdProcesses, db: Path
) -> None:
    env = {"TIMERD_SIGNING_SECRET": SECRET, "TIMERD_RETRY_SCHEDULE": "1s"}
    api = procs.start("api", store_url(db), env=env)
    start_daemon(procs, db, **env)
    answers = iter([503])  # the callback's receiver fails once, then takes it
    with (
        httpx.Client(base_url=api.base_url) as client,
        Receiver(respond=lambda _: 410) as target,
        Receiver(respond=lambda _: next(answers, 200)) as hook,
    ):
        timer_id = created(
            client,
            {"url": target.url, "seconds": 1, "payload": {"n": 1}, "on_failure_url": hook.url},
        )
        target.wait_for(1, timeout_s=15)
        first, second = hook.wait_for(2, timeout_s=20)[:2]
        view = callback_delivered(client, timer_id)
    assert len(target.arrivals) == 1, "a 410 is not retried"
    for n, arrival in enumerate((first, second), start=1):
        assert arrival.path == f"/hooks/{timer_id}"
        assert arrival.headers["webhook-id"] == f"{timer_id}_failed"
        body = Webhook(SECRET).verify(arrival.body, arrival.headers)
        assert (body["type"], body["id"], body["attempt"]) == ("timer.failed", timer_id, n)
        timer = body["timer"]
        assert (timer["state"], timer["last_status"], timer["payload"]) == ("failed", 410, {"n": 1})
        assert [h["status"] for h in timer["history"]] == [410]
    assert view["state"] == "failed" and view["on_failure_url"] == hook.url
    assert view["callback"] == {
        "state": "delivered",
        "attempts": 2,
        "last_status": 200,
        "last_error": None,
        "next_attempt_at": None,
        "occurrence": None,
    }


def test_each_failed_occurrence_of_a_series_sends_its_own_callback(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    start_daemon(procs, db)
    with (
        httpx.Client(base_url=api.base_url) as client,
        Receiver(respond=lambda _: 410) as target,
        Receiver() as hook,
    ):
        timer_id = created(client, {"url": target.url, "every": "1s", "on_failure_url": hook.url})
        arrivals = hook.wait_for(2, timeout_s=20)
        client.delete(f"/timers/{timer_id}")
    ids = [a.headers["webhook-id"] for a in arrivals[:2]]
    assert ids == [f"{timer_id}_1_failed", f"{timer_id}_2_failed"]
    bodies = [body_of(a) for a in arrivals[:2]]
    assert [b["occurrence"] for b in bodies] == [1, 2]
    assert all(b["timer"]["last_status"] == 410 for b in bodies)


def test_an_on_failure_url_the_ssrf_guard_denies_is_refused_at_create(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db), env={"TIMERD_ALLOWED_NETWORKS": ""})
    with httpx.Client(base_url=api.base_url) as client:
        answer = client.post(
            "/timers",
            json={
                "url": "https://example.com/hooks",
                "seconds": 60,
                "on_failure_url": "http://127.0.0.1:9/failures",
            },
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["field"] == "on_failure_url"
        assert client.get("/timers").json()["timers"] == []


def test_a_series_survives_a_daemon_kill_without_skipping_or_repeating_occurrences(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    daemon = start_daemon(procs, db)
    with httpx.Client(base_url=api.base_url) as client, Receiver() as receiver:
        timer_id = created(client, {"url": receiver.url, "every": "1s"})
        before = len(receiver.wait_for(3, timeout_s=15))
        daemon.kill()
        killed_at = len(receiver.arrivals)
        start_daemon(procs, db)
        arrivals = receiver.wait_for(killed_at + 3, timeout_s=30)
        client.delete(f"/timers/{timer_id}")
    assert before >= 3
    ids = [a.headers["webhook-id"] for a in arrivals]
    numbers = [body_of(a)["occurrence"] for a in arrivals]
    assert ids == [f"{timer_id}_{n}" for n in numbers]
    repeated = [n for n in set(numbers) if numbers.count(n) > 1]
    # Only the occurrence in flight at the kill may come again (at least once).
    assert len(repeated) <= 1, numbers
    if repeated:
        assert (
            numbers.index(repeated[0])
            < killed_at
            <= len(numbers) - numbers[::-1].index(repeated[0])
        )
    # No occurrence is skipped: each one is delivered, or counted by a catch-up's `missed`.
    missed = {body_of(a)["occurrence"]: body_of(a)["missed"] for a in arrivals}
    distinct = sorted(missed)
    assert distinct[0] == 1
    for earlier, later in itertools.pairwise(distinct):
        assert later == earlier + 1 + missed[earlier], (earlier, later, missed)


def test_a_callback_in_flight_when_the_daemon_is_killed_is_sent_again_not_lost(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    daemon = start_daemon(procs, db)
    with (
        httpx.Client(base_url=api.base_url) as client,
        Receiver(respond=lambda _: 410) as target,
        Receiver(delay_s=1.5) as hook,  # answers slowly: the first one is in flight at the kill
    ):
        timer_id = created(client, {"url": target.url, "seconds": 1, "on_failure_url": hook.url})
        hook.wait_for(1, timeout_s=15)
        daemon.kill()
        start_daemon(procs, db)
        again = hook.wait_for(2, timeout_s=30)
        view = callback_delivered(client, timer_id)
    assert [a.headers["webhook-id"] for a in again] == [f"{timer_id}_failed"] * 2
    assert [body_of(a)["attempt"] for a in again] == [1, 2]
    assert view["callback"]["attempts"] == 2
    assert len(target.arrivals) == 1
