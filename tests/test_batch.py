"""`POST /timers/batch` against real `timerd api` processes on real SQLite files: every item is
checked as a single create, the valid ones are stored in one transaction, one result per item
in order; idempotency per item, the 1,000-item limit and the tenant's pending cap. Also: the
OpenAPI document states the limits in force. Nothing sleeps; every wait is on an answer."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import TimerdProcess, TimerdProcesses

URL = "https://example.com/hooks"


def pending(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM timers WHERE state = 'pending'").fetchone()[
            0
        ]
        return count


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    path = tmp_path_factory.mktemp("batch")
    db = path / "timers.db"
    with TimerdProcesses(path) as procs:
        proc = procs.start("api", f"sqlite:///{db}")
        with httpx.Client(base_url=proc.base_url, timeout=30.0) as client:
            yield client, db


def post_batch(client: httpx.Client, items: Any) -> httpx.Response:
    return client.post("/timers/batch", content=json.dumps(items).encode())


def test_a_mixed_batch_answers_each_item_in_order_as_a_single_create_would(
    server: tuple[httpx.Client, Path],
) -> None:
    client, db = server
    before = pending(db)
    items: list[Any] = [
        {"url": f"{URL}/1", "seconds": 60},
        {"url": "http://169.254.169.254/latest", "seconds": 60},  # link-local: SSRF
        {"url": f"{URL}/2", "seconds": 60, "fire_at": "2030-01-01T00:00:00Z"},
        {"url": f"{URL}/3", "minutes": 5, "colour": "red"},
        "not an object",
        {"url": f"{URL}/4", "seconds": 120, "payload": {"order": 7}},
    ]
    response = post_batch(client, items)

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 422, 422, 422, 400, 201]
    for item, result in zip(items, results, strict=True):
        single = client.post("/timers", content=json.dumps(item).encode())
        assert single.status_code == result["status"]
        if single.status_code == 201:
            assert result["timer"]["url"] == item["url"]
            assert result["timer"]["state"] == "pending"
        else:
            assert result["error"] == single.json()["error"]
    assert results[5]["timer"]["payload"] == {"order": 7}
    stored = client.get(f"/timers/{results[0]['timer']['id']}")
    assert stored.status_code == 200 and stored.json()["url"] == f"{URL}/1"
    assert pending(db) == before + 2 + 2  # the batch's two, and the two single creates


def test_batch_items_are_idempotent_by_their_own_key(server: tuple[httpx.Client, Path]) -> None:
    client, db = server
    item = {"url": URL, "seconds": 600, "idempotency_key": "batch-key-1"}
    first = post_batch(client, [item]).json()["results"][0]
    before = pending(db)

    again = post_batch(client, [item, {**item, "seconds": 601}, item]).json()["results"]

    assert [r["status"] for r in again] == [201, 422, 201]
    assert again[0]["timer"]["id"] == again[2]["timer"]["id"] == first["timer"]["id"]
    assert again[0]["replayed"] is True and "replayed" not in first
    assert again[1]["error"]["code"] == "idempotency_conflict"
    assert pending(db) == before
    # the same key and body through the single create's header: the same timer
    single = client.post(
        "/timers",
        content=json.dumps({"url": URL, "seconds": 600}).encode(),
        headers={"Idempotency-Key": "batch-key-1"},
    )
    assert single.status_code == 201 and single.json()["id"] == first["timer"]["id"]
    assert single.headers["idempotent-replayed"] == "true"


def test_one_key_twice_in_a_new_batch_stores_one_timer(server: tuple[httpx.Client, Path]) -> None:
    client, db = server
    before = pending(db)
    item = {"url": URL, "seconds": 600, "idempotency_key": "twice-in-one"}
    results = post_batch(client, [item, item]).json()["results"]
    assert [r["status"] for r in results] == [201, 201]
    assert results[0]["timer"]["id"] == results[1]["timer"]["id"]
    assert pending(db) == before + 1


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        pytest.param(b"[]", {}, 422, "invalid_body", id="empty"),
        pytest.param(b'{"url": "x"}', {}, 400, "invalid_body", id="object-not-array"),
        pytest.param(b"[1e400]", {}, 400, "invalid_json", id="not-finite"),
        pytest.param(b"[{", {}, 400, "invalid_json", id="not-json"),
        pytest.param(b"[{}]", {"Idempotency-Key": "k"}, 400, "invalid_idempotency_key", id="hdr"),
    ],
)
def test_a_bad_batch_is_a_clear_4xx(
    server: tuple[httpx.Client, Path],
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    client, _ = server
    response = client.post("/timers/batch", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_a_batch_of_1000_is_stored_and_1001_is_refused(server: tuple[httpx.Client, Path]) -> None:
    client, db = server
    items = [{"url": f"{URL}/{i}", "hours": 1} for i in range(1001)]
    before = pending(db)

    refused = post_batch(client, items)
    assert refused.status_code == 413
    assert refused.json()["error"] == {
        "code": "too_many_timers",
        "message": "a batch may hold at most 1000 timers",
        "limit": 1000,
    }
    assert pending(db) == before

    stored = post_batch(client, items[:1000])
    assert stored.status_code == 200
    results = stored.json()["results"]
    assert len(results) == 1000 and {r["status"] for r in results} == {201}
    assert len({r["timer"]["id"] for r in results}) == 1000
    assert pending(db) == before + 1000


def test_the_pending_cap_refuses_the_items_past_it(tmp_path: Path) -> None:
    db = tmp_path / "cap.db"
    with TimerdProcesses(tmp_path) as procs:
        proc: TimerdProcess = procs.start(
            "api", f"sqlite:///{db}", env={"TIMERD_MAX_PENDING_PER_TENANT": "3"}
        )
        with httpx.Client(base_url=proc.base_url, timeout=10.0) as client:
            items = [{"url": URL, "seconds": 60, "idempotency_key": f"k{i}"} for i in range(5)]
            results = post_batch(client, items).json()["results"]
            assert [r["status"] for r in results] == [201, 201, 201, 429, 429]
            assert results[3]["error"]["code"] == "too_many_pending"
            # a retry of what was stored still gets its timers at the cap
            again = post_batch(client, items[:2]).json()["results"]
            assert [r["status"] for r in again] == [201, 201]
            assert all(r["replayed"] for r in again)
    assert pending(db) == 3


def test_the_openapi_document_states_the_limits_in_force(tmp_path: Path) -> None:
    env = {
        "TIMERD_MAX_URL_CHARS": "4096",
        "TIMERD_MAX_BODY_BYTES": "32768",
        "TIMERD_MAX_PAYLOAD_BYTES": "12345",
    }
    with TimerdProcesses(tmp_path) as procs:
        proc = procs.start("api", f"sqlite:///{tmp_path / 'doc.db'}", env=env)
        document = httpx.get(f"{proc.base_url}/openapi.json", timeout=10.0).json()
    schemas = document["components"]["schemas"]
    for body in ("CreateTimer", "ChangeTimer", "BatchItem"):
        assert schemas[body]["properties"]["url"]["maxLength"] == 4096
        assert schemas[body]["properties"]["on_failure_url"]["maxLength"] == 4096
        assert "at most 12345 bytes" in schemas[body]["properties"]["payload"]["description"]
    too_large = document["paths"]["/timers"]["post"]["responses"]["413"]["description"]
    assert too_large == "The body is over 32768 bytes."
    assert "/timers/batch" in document["paths"]
