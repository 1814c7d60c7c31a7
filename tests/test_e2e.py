"""End to end with real processes: `timerd api` and `timerd daemon` subprocesses on one SQLite
file, timers created over HTTP, webhooks received by a real loopback receiver."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

from tests.support.cluster import (
    POLL_S,
    TTL_S,
    ids_in,
    leader_pid,
    now_ms,
    rfc3339,
    start_daemon,
    states,
    store_url,
)
from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.models import State


def create(api: TimerdProcess, url: str, due_at_ms: int) -> str:
    timer_id, _ = created(api, url, due_at_ms)
    return timer_id


def created(api: TimerdProcess, url: str, due_at_ms: int) -> tuple[str, int]:
    """A new timer's id and the due time the API answered: `due_at_ms`, or the moment of its
    creation when a loaded machine made it only after `due_at_ms` (a time past fires now)."""
    answer = httpx.post(f"{api.base_url}/timers", json={"url": url, "fire_at": rfc3339(due_at_ms)})
    assert answer.status_code == 201, answer.text
    timer = answer.json()
    answered_ms = round(datetime.fromisoformat(timer["fire_at"]).timestamp() * 1000)
    assert answered_ms >= due_at_ms
    return timer["id"], answered_ms


def create_many(api: TimerdProcess, url: str, dues_ms: list[int]) -> dict[str, int]:
    """Each new timer's id, with its due time as answered (see `created`)."""
    return dict(created(api, url, due) for due in dues_ms)


def test_timers_fire_at_their_url_with_the_contract_and_never_early(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    start_daemon(procs, db)
    with Receiver() as receiver:
        start = now_ms() + 1500
        due = create_many(api, receiver.url + "?k=1", [start + 25 * i for i in range(30)])
        arrivals = receiver.wait_for(len(due), timeout_s=15)
        wait_until(lambda: states(db, list(due))[State.FIRED] == len(due), 10, "all fired")
        fired = httpx.get(f"{api.base_url}/timers/{next(iter(due))}").json()
    assert ids_in(arrivals) == Counter(list(due))
    assert (fired["state"], fired["attempts"], fired["last_status"]) == ("fired", 1, 200)
    for arrival in arrivals:
        timer_id = arrival.timer_id
        assert (arrival.path, arrival.query) == (f"/hooks/{timer_id}", "k=1")
        assert arrival.headers["webhook-id"] == timer_id
        assert json.loads(arrival.body)["due_at_ms"] == due[timer_id]
        assert arrival.at_ms >= due[timer_id], "fired early"


def test_kill_9_loses_nothing_and_repeats_only_what_was_in_flight(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    first = start_daemon(procs, db, TIMERD_CONCURRENCY="8")
    with Receiver(delay_s=0.2) as receiver:
        due = create_many(api, receiver.url, [now_ms() + 1000] * 120)
        receiver.wait_for(30, timeout_s=15)
        first.kill()
        in_flight = {i for i in due if states(db, [i])[State.FIRING]}
        arrived_before_kill = set(ids_in(receiver.arrivals))
        start_daemon(procs, db, TIMERD_CONCURRENCY="8")
        wait_until(lambda: states(db, list(due))[State.FIRED] == len(due), 30, "all fired")
        arrivals = list(receiver.arrivals)
    counts = ids_in(arrivals)
    repeated = {i for i, n in counts.items() if n > 1}
    assert set(counts) == set(due)
    assert repeated <= in_flight <= arrived_before_kill
    assert len(in_flight) <= 8
    assert all(a.headers["webhook-id"] == a.timer_id for a in arrivals)


def test_two_daemons_deliver_each_timer_once(procs: TimerdProcesses, db: Path) -> None:
    api = procs.start("api", store_url(db))
    start_daemon(procs, db)
    start_daemon(procs, db, lead=False)
    with Receiver() as receiver:
        start = now_ms() + 1500
        due = create_many(api, receiver.url, [start + 5 * i for i in range(200)])
        receiver.wait_for(len(due), timeout_s=15)
        wait_until(lambda: states(db, list(due))[State.FIRED] == len(due), 10, "all fired")
        counts = ids_in(receiver.arrivals)
    assert counts == Counter(list(due))


def test_a_standby_takes_over_within_the_ttl_when_the_leader_is_killed(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    leader = start_daemon(procs, db)
    standby = start_daemon(procs, db, lead=False)
    with Receiver() as receiver:
        killed_ms = now_ms()
        leader.kill()
        create(api, receiver.url, now_ms())
        [arrival] = receiver.wait_for(1, timeout_s=15)
    assert leader_pid(db) == standby.pid
    assert arrival.at_ms - killed_ms <= (TTL_S + POLL_S + 1.0) * 1000


def test_sigterm_drains_releases_and_a_standby_carries_on_at_once(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    leader = start_daemon(procs, db, TIMERD_CONCURRENCY="8")
    standby = start_daemon(procs, db, lead=False, TIMERD_CONCURRENCY="8")
    with Receiver(delay_s=0.2) as receiver:
        due = create_many(api, receiver.url, [now_ms() + 1000] * 80)
        receiver.wait_for(16, timeout_s=15)
        assert leader.stop() == 0
        receiver.wait_for(len(due), timeout_s=20)
        wait_until(lambda: states(db, list(due))[State.FIRED] == len(due), 10, "all fired")
        arrivals = list(receiver.arrivals)
    assert ids_in(arrivals) == Counter(list(due)), "lost or repeated a timer"
    assert leader_pid(db) == standby.pid, standby.describe("does not hold partition 0")
    released_ms = logged_at_ms(leader, "leader_released")
    after_release = [a.at_ms for a in arrivals if a.at_ms > released_ms]
    assert after_release and min(after_release) - released_ms <= (POLL_S + 1.0) * 1000


def test_the_daemon_rides_out_a_store_it_cannot_write(procs: TimerdProcesses, db: Path) -> None:
    api = procs.start("api", store_url(db))
    daemon = start_daemon(procs, db)
    with Receiver() as receiver:
        timer_id = create(api, receiver.url, now_ms() + 500)
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        wait_until(lambda: "store_unavailable" in daemon.stderr(), 10, "the outage to be seen")
        assert receiver.arrivals == []
        unlocked_ms = now_ms()
        locker.execute("COMMIT")
        locker.close()
        [arrival] = receiver.wait_for(1, timeout_s=15)
    assert arrival.timer_id == timer_id and arrival.at_ms >= unlocked_ms
    assert daemon.running()


def logged_at_ms(proc: TimerdProcess, event: str) -> int:
    """When `proc` logged `event` (its JSON log line's timestamp), in epoch milliseconds."""
    for line in proc.stderr().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            moment = datetime.fromisoformat(json.loads(line)["timestamp"])
            return round(moment.timestamp() * 1000)
    raise AssertionError(f"{event} was never logged:\n{proc.stderr()}")
