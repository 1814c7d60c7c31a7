"""`GET /stats` and `GET /timers?url_prefix=` against real `timerd api` processes.

The daemon's part (claims, outcomes, the lease) is played through the store, at known times, so
that every figure can be checked exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import TimerdProcesses
from timerd import keys
from timerd.models import PARTITIONS, AttemptRecord, Claim, Outcome, State, Timer, new_timer_id
from timerd.store.sqlite import SqliteStore


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fire(store: SqliteStore, timer: Timer, state: State, at_ms: int, status: int) -> None:
    """Insert `timer`, claim it and record one attempt ending in `state` at `at_ms`."""
    store.insert(timer)
    claim = Claim("test", now_ms=at_ms, until_ms=at_ms + 60_000, token=new_timer_id())
    assert len(store.claim_due([timer.id], claim)) == 1
    record = AttemptRecord(attempt=1, at_ms=at_ms, latency_ms=3.0, status=status)
    outcome = Outcome(timer.id, claim.token, state, at_ms, status=status, record=record)
    assert store.complete([outcome]) == 1


def a_timer(due_at_ms: int, tenant: str = "", url: str = "https://a.example/h") -> Timer:
    return Timer(new_timer_id(), url, due_at_ms, due_at_ms - 1_000, tenant=tenant)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "timerd.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(str(db))
    yield opened
    opened.close()


def get(base_url: str, path: str, **params: str) -> httpx.Response:
    return httpx.get(f"{base_url}{path}", params=params, timeout=5.0)


def test_stats_of_an_empty_store(procs: TimerdProcesses, db: Path) -> None:
    api = procs.start("api", f"sqlite:///{db}")
    stats = get(api.base_url, "/stats").json()
    assert stats["counts"] == dict.fromkeys([s.value for s in State], 0)
    assert stats["counts_limit"] == 10_000
    assert stats["backlog"] == {"pending": 0, "next": None}
    assert stats["recent"]["fired"] == stats["recent"]["failed"] == 0
    assert stats["recent"]["lateness_ms"] is None
    assert stats["firing"] == {"partitions": PARTITIONS, "held": 0, "daemons": []}


def test_stats_count_the_backlog_lateness_failures_and_who_fires(
    procs: TimerdProcesses, db: Path, store: SqliteStore
) -> None:
    now = now_ms()
    overdue = a_timer(now - 7_000)
    store.insert(overdue)
    store.insert(a_timer(now + 60_000))
    for late_ms in (1, 2, 3, 40):  # fired within the last minute, this late
        fire(store, a_timer(now - 10_000), State.FIRED, now - 10_000 + late_ms, 200)
    fire(store, a_timer(now - 3_600_000), State.FIRED, now - 3_590_000, 200)  # an hour ago
    fire(store, a_timer(now - 5_000), State.FAILED, now - 4_000, 410)
    store.insert(a_timer(now - 5_000, tenant="other"))  # another tenant's: not counted
    store.acquire_lease("member:web1:42:abc", "web1:42:abc", 10_000, now)
    for partition in range(10):
        store.acquire_lease(f"p{partition}", "web1:42:abc", 10_000, now)
    store.acquire_lease("p10", "web1:7:gone", 10_000, now - 60_000)  # expired: not held

    api = procs.start("api", f"sqlite:///{db}")
    stats: dict[str, Any] = get(api.base_url, "/stats").json()
    assert stats["counts"] == {
        "pending": 2,
        "firing": 0,
        "fired": 5,
        "failed": 1,
        "cancelled": 0,
        "paused": 0,
    }
    assert stats["backlog"]["pending"] == 2
    assert stats["backlog"]["next"]["id"] == overdue.id
    assert stats["backlog"]["next"]["overdue_ms"] >= 7_000
    recent = stats["recent"]
    assert (recent["fired"], recent["failed"], recent["failed_attempts"]) == (4, 1, 1)
    assert recent["fired_per_s"] == pytest.approx(4 / 60, abs=0.001)
    assert recent["lateness_ms"] == {"p50": 2.5, "p99": 40, "max": 40}
    assert stats["firing"] == {
        "partitions": PARTITIONS,
        "held": 10,
        "daemons": [{"holder": "web1:42:abc", "partitions": 10}],
    }


def test_stats_are_the_key_tenants_only_and_need_a_key(
    procs: TimerdProcesses, db: Path, store: SqliteStore
) -> None:
    token, key = keys.new_key("acme", "acme", now_ms())
    store.add_key(key)
    store.insert(a_timer(now_ms() + 60_000, tenant="acme"))
    for _ in range(3):
        store.insert(a_timer(now_ms() + 60_000, tenant="globex"))
    api = procs.start("api", f"sqlite:///{db}", env={"TIMERD_AUTH": "keys"})
    assert get(api.base_url, "/stats").status_code == 401
    answer = httpx.get(f"{api.base_url}/stats", headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["counts"]["pending"] == 1


def test_listing_by_url_prefix_finds_one_hosts_timers(
    procs: TimerdProcesses, db: Path, store: SqliteStore
) -> None:
    wanted = []
    for n in range(6):
        url = "https://a.example/h" if n % 2 else "https://b.example/h"
        timer = a_timer(now_ms() + 60_000, url=url)
        store.insert(timer)
        if n % 2:
            wanted.append(timer.id)
    api = procs.start("api", f"sqlite:///{db}")
    page = get(api.base_url, "/timers", url_prefix="https://a.example/", limit="2").json()
    assert [t["id"] for t in page["timers"]] == wanted[::-1][:2]
    rest = get(
        api.base_url, "/timers", url_prefix="https://a.example/", cursor=page["next_cursor"]
    ).json()
    assert [t["id"] for t in rest["timers"]] == wanted[::-1][2:]
    assert rest["next_cursor"] is None
    for bad in ("", "https://a.example/\x01"):
        answer = get(api.base_url, "/timers", url_prefix=bad)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["field"] == "url_prefix"
