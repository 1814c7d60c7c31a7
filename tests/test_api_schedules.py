"""Series and local times through the API, in process, on a clock the test sets: the answers
(views, 422s) are then exact instants, whatever the date the suite runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.base import Store

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOW = "2026-01-01T00:00:00+00:00"
URL = "https://example.com/hooks"


class FixedClock:
    def __init__(self, at: str) -> None:
        self.ms = (datetime.fromisoformat(at) - EPOCH) // timedelta(milliseconds=1)

    def now_ms(self) -> int:
        return self.ms

    def monotonic_s(self) -> float:
        return self.ms / 1000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    yield s
    s.close()


def call(store: Store, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to an app over `store` at NOW; returns (status, JSON body)."""
    app = create_app(Settings(auth="none"), store, clock=FixedClock(NOW))

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, json=body)

    response = asyncio.run(send())
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("local", "tz", "fire_at"),
    [
        ("2026-03-29T02:30:00", "Europe/Berlin", "2026-03-29T01:00:00.000Z"),
        ("2026-10-25T02:30:00", "Europe/Berlin", "2026-10-25T00:30:00.000Z"),
        ("2026-03-08T02:30:00", "America/New_York", "2026-03-08T07:00:00.000Z"),
        ("2026-11-01T01:30:00", "America/New_York", "2026-11-01T05:30:00.000Z"),
    ],
)
def test_fire_at_local_resolves_gaps_and_repeats_by_the_documented_rule(
    store: Store, local: str, tz: str, fire_at: str
) -> None:
    status, timer = call(
        store, "POST", "/timers", {"url": URL, "fire_at_local": local, "timezone": tz}
    )
    assert status == 201, timer
    assert (timer["fire_at"], timer["recurring"]) == (fire_at, False)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"fire_at_local": "2026-12-24T09:00:00"}, "timezone"),
        ({"fire_at_local": "2026-12-24T09:00:00", "timezone": "Nowhere/City"}, "timezone"),
        ({"fire_at_local": "2026-12-24T09:00:00Z", "timezone": "UTC"}, "fire_at_local"),
        (
            {"fire_at_local": "2026-12-24T09:00:00", "timezone": "UTC", "seconds": 1},
            "fire_at_local",
        ),
        ({"seconds": 5, "timezone": "UTC"}, "timezone"),
        ({"every": "0.5s"}, "every"),
        ({"every": "soon"}, "every"),
        ({"every": "1s", "cron": "* * * * *"}, "cron"),
        ({"every": "1s", "fire_at": "2026-02-01T00:00:00Z"}, "every"),
        ({"every": "1s", "timezone": "UTC"}, "timezone"),
        ({"cron": "0 9 * * *", "start_at": "2026-02-01T00:00:00Z"}, "start_at"),
        ({"cron": "0 9 * * *", "until": "2026-01-01T08:00:00Z"}, "until"),
        ({"cron": "0 9 * * *", "max_occurrences": 0}, "max_occurrences"),
        ({"cron": "0 9 * * *", "catch_up": "never"}, "catch_up"),
        ({"max_occurrences": 3, "seconds": 5}, "max_occurrences"),
    ],
)
def test_bad_schedules_and_local_times_answer_422_naming_the_field_and_store_nothing(
    store: Store, fields: dict[str, Any], field: str
) -> None:
    status, answer = call(store, "POST", "/timers", {"url": URL, **fields})
    assert (status, answer["error"]["field"]) == (422, field), answer
    assert store.list_timers(None, None, 10) == []


def test_a_cron_series_shows_its_schedule_and_next_occurrences_in_its_zone(store: Store) -> None:
    body = {"url": URL, "cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"}
    status, timer = call(store, "POST", "/timers", body)
    assert status == 201, timer
    assert timer["schedule"] == {
        "cron": "0 9 * * MON-FRI",
        "timezone": "Europe/Berlin",
        "until": None,
        "max_occurrences": None,
        "catch_up": "once",
    }
    assert (timer["occurrence"], timer["occurrences"], timer["recurring"]) == (1, 0, True)
    assert timer["next_fire_at"] == timer["fire_at"] == "2026-01-01T08:00:00.000Z"
    assert timer["upcoming"] == [
        "2026-01-01T08:00:00.000Z",
        "2026-01-02T08:00:00.000Z",
        "2026-01-05T08:00:00.000Z",
        "2026-01-06T08:00:00.000Z",
        "2026-01-07T08:00:00.000Z",
    ]
    _, one_off = call(store, "POST", "/timers", {"url": URL, "seconds": 60})
    _, page = call(store, "GET", "/timers?recurring=true")
    assert [t["id"] for t in page["timers"]] == [timer["id"]]
    _, page = call(store, "GET", "/timers?recurring=false")
    assert [t["id"] for t in page["timers"]] == [one_off["id"]]


def test_pause_resume_and_patch_a_series(store: Store) -> None:
    _, timer = call(store, "POST", "/timers", {"url": URL, "every": "1h", "max_occurrences": 3})
    assert timer["upcoming"] == [
        "2026-01-01T01:00:00.000Z",
        "2026-01-01T02:00:00.000Z",
        "2026-01-01T03:00:00.000Z",
    ]
    path = f"/timers/{timer['id']}"
    status, paused = call(store, "POST", f"{path}/pause")
    assert (status, paused["state"], paused["upcoming"]) == (200, "paused", [])
    assert call(store, "POST", f"{path}/pause")[0] == 409
    status, changed = call(store, "PATCH", path, {"every": "30m", "url": URL + "/2"})
    assert (status, changed["state"], changed["url"]) == (200, "paused", URL + "/2")
    assert changed["schedule"]["every"] == "30m"
    status, resumed = call(store, "POST", f"{path}/resume")
    assert (status, resumed["state"], resumed["next_fire_at"]) == (
        200,
        "pending",
        "2026-01-01T00:30:00.000Z",
    )
    assert call(store, "PATCH", path, {"seconds": 5})[1]["error"]["field"] == "seconds"
    _, one_off = call(store, "POST", "/timers", {"url": URL, "seconds": 60})
    assert call(store, "POST", f"/timers/{one_off['id']}/pause")[0] == 404
    answer = call(store, "PATCH", f"/timers/{one_off['id']}", {"every": "1h"})[1]
    assert answer["error"]["field"] == "every"
    status, ended = call(store, "DELETE", path)
    assert (status, ended["state"]) == (200, "cancelled")
