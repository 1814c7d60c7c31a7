"""The HTTP API against real `timerd api` processes on real SQLite files, through httpx.

Most tests share one server (module scope); those that kill, lock or reconfigure a server start
their own. Nothing here sleeps to synchronise: every wait is on an answer or an exit.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.hostile import NOT_FINITE_NUMBERS, UNDELIVERABLE_URLS
from tests.support.procs import TimerdProcess, TimerdProcesses, free_port, run_timerd
from tests.support.timers import put_in_state
from timerd.models import State

URL = "https://example.com/hooks"
MAX_BODY = 16 * 1024
DEFAULT_CAP_S = 365 * 86_400
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ID = re.compile(r"[0-9a-f]{24}")
VIEW_FIELDS = {"id", "time_left", "state", "fire_at", "url", "attempts"}


# helpers


def sqlite_url(path: Path, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def row_count(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM timers").fetchone()[0]
        return count


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_ms(rfc3339: str) -> int:
    """An RFC 3339 time as UTC epoch milliseconds, exactly (no float on the way)."""
    moment = datetime.fromisoformat(rfc3339)
    assert moment.tzinfo is not None, rfc3339
    return (moment - EPOCH) // timedelta(milliseconds=1)


def body(**fields: Any) -> bytes:
    """A create body: `url` is URL unless given."""
    return json.dumps({"url": URL, **fields}).encode()


def padded(size: int) -> bytes:
    """A valid create body of exactly `size` bytes (padded with JSON whitespace)."""
    core = body(seconds=60)
    return core[:-1] + b" " * (size - len(core)) + b"}"


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """POST a timer and return the answer, which must be a 201."""
    response = client.post("/timers", content=body(**fields))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The answer is `status` with the one error shape; returns the `error` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


@dataclass
class Api:
    proc: TimerdProcess
    db: Path
    client: httpx.Client

    def create(self, **fields: Any) -> dict[str, Any]:
        return create(self.client, **fields)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    path = tmp_path_factory.mktemp("api")
    db = path / "timers.db"
    with TimerdProcesses(path) as procs:
        proc = procs.start("api", sqlite_url(db))
        with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
            yield Api(proc, db, client)


# create


@pytest.mark.parametrize(
    ("fields", "delay_ms", "time_left"),
    [
        pytest.param({"hours": 4, "minutes": 0, "seconds": 1}, 14_401_000, 14_401, id="seed"),
        pytest.param({"seconds": 0.5}, 500, 1, id="half-second-rounds-up"),
        pytest.param({"seconds": 0.001}, 1, 1, id="one-millisecond"),
        pytest.param({"seconds": 1.001}, 1_001, 2, id="decimal-seconds"),
        pytest.param({"minutes": 0.5, "seconds": 0.25}, 30_250, 31, id="decimal-minutes"),
        pytest.param({"hours": 0.001}, 3_600, 4, id="decimal-hours"),
        pytest.param({"minutes": 2}, 120_000, 120, id="minutes-only"),
        pytest.param({"hours": 1, "seconds": 0}, 3_600_000, 3_600, id="hours-and-zero"),
        pytest.param({"hours": 8760}, DEFAULT_CAP_S * 1000, DEFAULT_CAP_S, id="exactly-the-cap"),
    ],
)
def test_create_answers_201_with_id_time_left_location_and_due_time(
    api: Api, fields: dict[str, Any], delay_ms: int, time_left: int
) -> None:
    before = now_ms()
    response = api.client.post("/timers", content=body(**fields))
    after = now_ms()

    assert response.status_code == 201, response.text
    created = response.json()
    assert ID.fullmatch(created["id"])
    assert created["time_left"] == time_left
    assert response.headers["location"] == f"/timers/{created['id']}"
    assert created["state"] == "pending"
    assert created["url"] == URL
    assert created["attempts"] == 0
    assert to_ms(created["fire_at"]) - to_ms(created["created_at"]) == delay_ms
    assert before <= to_ms(created["created_at"]) <= after


def test_location_of_a_new_timer_reads_it_back(api: Api) -> None:
    response = api.client.post("/timers", content=body(seconds=30))
    read = api.client.get(response.headers["location"])
    assert read.status_code == 200
    assert read.json()["id"] == response.json()["id"]


def test_create_with_fire_at_in_the_future_keeps_the_instant(api: Api) -> None:
    due_ms = now_ms() + 100_000  # the server reads its clock a little later: 99.x s → 100
    local = timezone(timedelta(hours=2))
    fire_at = (EPOCH + timedelta(milliseconds=due_ms)).astimezone(local)

    created = api.create(fire_at=fire_at.isoformat(timespec="milliseconds"))

    assert created["time_left"] == 100
    assert created["fire_at"].endswith("Z")
    assert to_ms(created["fire_at"]) == due_ms
    assert created["state"] == "pending"


@pytest.mark.parametrize(
    "fire_at", ["2001-01-01T00:00:00Z", "1970-01-01t00:00:00.5z", "2020-06-30T23:59:59-07:00"]
)
def test_create_with_fire_at_in_the_past_fires_now(api: Api, fire_at: str) -> None:
    before = now_ms()
    created = api.create(fire_at=fire_at)

    assert created["time_left"] == 0
    assert created["state"] == "pending"
    assert to_ms(created["fire_at"]) == to_ms(created["created_at"]) >= before


def test_create_accepts_a_body_of_exactly_the_limit(api: Api) -> None:
    exact = padded(MAX_BODY)
    assert len(exact) == MAX_BODY
    assert api.client.post("/timers", content=exact).status_code == 201
    chunked = api.client.post("/timers", content=iter([exact[:9000], exact[9000:]]))
    assert chunked.status_code == 201, chunked.text


# read


def test_get_answers_every_field(api: Api) -> None:
    created = api.create(minutes=10)

    response = api.client.get(f"/timers/{created['id']}")

    assert response.status_code == 200
    read = response.json()
    assert read.keys() >= VIEW_FIELDS
    assert {k: read[k] for k in VIEW_FIELDS - {"time_left"}} == {
        k: created[k] for k in VIEW_FIELDS - {"time_left"}
    }
    assert 599 <= read["time_left"] <= 600


@pytest.mark.parametrize(
    "timer_id",
    [
        "0123456789abcdef01234567",  # well formed, never created
        "xyz",
        "0123456789abcdef0123456",  # 23 hex digits
        "0123456789abcdef012345678",  # 25
        "0123456789abcdef0123456g",
        "%20",
        "%F0%9F%95%90%F0%9F%95%90%F0%9F%95%90%F0%9F%95%90%F0%9F%95%90%F0%9F%95%90",
    ],
)
def test_get_or_cancel_of_an_unknown_or_malformed_id_is_404(api: Api, timer_id: str) -> None:
    assert_error(api.client.get(f"/timers/{timer_id}"), 404, "not_found")
    assert_error(api.client.delete(f"/timers/{timer_id}"), 404, "not_found")


# cancel


def test_cancel_a_pending_timer_then_again_is_a_conflict(api: Api) -> None:
    created = api.create(hours=1)
    path = f"/timers/{created['id']}"

    cancelled = api.client.delete(path)
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["time_left"] == 0
    assert cancelled.json()["id"] == created["id"]

    error = assert_error(api.client.delete(path), 409, "state_conflict")
    assert error["state"] == "cancelled"
    assert api.client.get(path).json() == cancelled.json()


@pytest.mark.parametrize("outcome", [None, State.FIRED, State.FAILED])
def test_cancel_of_a_firing_or_finished_timer_is_409_and_changes_nothing(
    api: Api, outcome: State | None
) -> None:
    created = api.create(fire_at="2001-01-01T00:00:00Z")
    put_in_state(api.db, created["id"], outcome)
    state = (outcome or State.FIRING).value
    path = f"/timers/{created['id']}"
    before = api.client.get(path).json()
    assert before["state"] == state
    assert before["attempts"] == 1

    error = assert_error(api.client.delete(path), 409, "state_conflict")

    assert error["state"] == state
    assert api.client.get(path).json() == before


# bad input: a 4xx with a JSON error naming the problem, and nothing stored

FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds")
DIGITS = "9" * 5000


@dataclass(frozen=True)
class Chunked:
    """A body sent with `Transfer-Encoding: chunked`, no `Content-Length`."""

    data: bytes


def _bad(content: bytes | Chunked, status: int, code: str, case_id: str, **details: Any) -> Any:
    return pytest.param(content, status, code, details, id=case_id)


def _bad_numbers() -> list[Any]:
    values: list[tuple[str, Any]] = [
        ("string", "10"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("array", [1]),
        ("object", {"n": 1}),
        ("negative", -1),
        ("negative-decimal", -0.001),
        ("huge-finite", 1.7e308),  # finite, but not once turned into milliseconds
        ("overflowing", 1e302),
    ]
    cases = [
        _bad(body(**{field: value}), 422, "invalid_field", f"{field}-{name}", field=field)
        for field in ("hours", "minutes", "seconds")
        for name, value in values
    ]
    for field in ("hours", "minutes", "seconds"):
        for name, literal in NOT_FINITE_NUMBERS.items():
            raw = f'{{"url": "{URL}", "{field}": {literal}}}'.encode()
            cases.append(_bad(raw, 400, "invalid_json", f"{field}-{name}"))
    return cases


def _bad_urls() -> list[Any]:
    urls = {
        "ftp": "ftp://example.com/hooks",
        "mailto": "mailto:hooks@example.com",
        "javascript": "javascript:alert(1)",
        "relative": "/hooks",
        "no-scheme": "example.com/hooks",
        "space-in-host": "https://exa mple.com/hooks",
        "space-in-path": "https://example.com/my hooks",
        "tab": "https://example.com/\thooks",
        "nul": "https://example.com/\x00",
        "del": "https://example.com/\x7f",
        "too-long": "https://example.com/" + "a" * (2049 - len("https://example.com/")),
        "user-info": "https://user:secret@example.com/hooks",
        "user-only": "https://user@example.com/hooks",
        "fragment": "https://example.com/hooks#part",
        "empty-fragment": "https://example.com/hooks#",
        "no-host": "https:///hooks",
        "scheme-only": "http://",
        "port-only": "https://:8080/hooks",
        "port-zero": "https://example.com:0/hooks",
        "port-too-big": "https://example.com:65536/hooks",
        "port-not-a-number": "https://example.com:http/hooks",
        "broken-ipv6": "http://[::1/hooks",
        "empty": "",
        **UNDELIVERABLE_URLS,
    }
    cases = [
        _bad(body(seconds=1, url=url), 422, "invalid_field", f"url-{name}", field="url")
        for name, url in urls.items()
    ]
    for name, value in (("null", None), ("number", 1), ("array", [URL]), ("object", {})):
        cases.append(
            _bad(body(seconds=1, url=value), 422, "invalid_field", f"url-{name}", field="url")
        )
    cases.append(
        _bad(json.dumps({"seconds": 1}).encode(), 422, "invalid_field", "url-missing", field="url")
    )
    return cases


def _bad_fire_at() -> list[Any]:
    values: dict[str, Any] = {
        "words": "tomorrow",
        "empty": "",
        "number": 1_900_000_000,
        "null": None,
        "true": True,
        "array": [FUTURE],
        "date-only": "2030-01-01",
        "no-seconds": "2030-01-01T00:00Z",
        "month-13": "2030-13-01T00:00:00Z",
        "february-30": "2030-02-30T00:00:00Z",
        "hour-25": "2030-01-01T25:00:00Z",
        "second-60": "2030-01-01T00:00:60Z",
        "offset-24h": "2030-01-01T00:00:00+24:00",
        "year-zero": "0000-01-01T00:00:00Z",
        "seven-fraction-digits": "2030-01-01T00:00:00.1234567Z",
        "no-offset": "2030-01-01T00:00:00",
        "no-offset-fraction": "2030-01-01T00:00:00.5",
        "past-the-cap": "2999-01-01T00:00:00Z",
        "last-rfc3339-second": "9999-12-31T23:59:59Z",
    }
    cases = [
        _bad(body(fire_at=value), 422, "invalid_field", f"fire_at-{name}", field="fire_at")
        for name, value in values.items()
    ]
    for name, extra in (("seconds", {"seconds": 1}), ("zero-hours", {"hours": 0})):
        cases.append(
            _bad(
                body(fire_at=FUTURE, **extra),
                422,
                "invalid_field",
                f"fire_at-and-{name}",
                field="fire_at",
            )
        )
    return cases


BAD_INPUT = [
    _bad(b'{"seconds": 1, "url": ', 400, "invalid_json", "truncated-json"),
    _bad(b"", 400, "invalid_json", "empty-body"),
    _bad(b"{'seconds': 1}", 400, "invalid_json", "single-quotes"),
    _bad(body(seconds=1) + b" x", 400, "invalid_json", "trailing-garbage"),
    _bad(b'{"url": "\xff\xfe", "seconds": 1}', 400, "invalid_json", "not-utf8"),
    _bad(b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "deeply-nested"),
    _bad(body(seconds=1, url=URL + "/\ud800"), 400, "invalid_json", "url-lone-surrogate"),
    _bad(body(seconds=1, **{"\udc00": 1}), 400, "invalid_json", "name-lone-surrogate"),
    _bad(json.dumps([{"url": URL, "seconds": 1}]).encode(), 400, "invalid_body", "array"),
    _bad(b'"https://example.com/hooks"', 400, "invalid_body", "string"),
    _bad(b"60", 400, "invalid_body", "number"),
    _bad(b"null", 400, "invalid_body", "null"),
    _bad(b"true", 400, "invalid_body", "boolean"),
    _bad(padded(MAX_BODY + 1), 413, "body_too_large", "too-large"),
    _bad(Chunked(padded(MAX_BODY + 1)), 413, "body_too_large", "too-large-chunked"),
    _bad(Chunked(padded(1024 * 1024)), 413, "body_too_large", "far-too-large-chunked"),
    _bad(body(), 422, "invalid_field", "no-duration", field="seconds"),
    _bad(body(hours=0, minutes=0, seconds=0), 422, "invalid_field", "all-zero", field="seconds"),
    _bad(body(seconds=0.0004), 422, "invalid_field", "under-a-millisecond", field="seconds"),
    _bad(body(hours=8760.001), 422, "invalid_field", "past-cap-h", field="hours"),
    _bad(body(seconds=DEFAULT_CAP_S + 1), 422, "invalid_field", "past-cap-s", field="seconds"),
    _bad(body(minutes=1e20), 422, "invalid_field", "far-past-cap-min", field="minutes"),
    _bad(body(seconds=1, foo=1), 422, "unknown_field", "unknown-field", fields=["foo"]),
    _bad(body(delay=5, URL=URL), 422, "unknown_field", "unknown-fields", fields=["URL", "delay"]),
    *_bad_numbers(),
    *_bad_urls(),
    *_bad_fire_at(),
]


@pytest.mark.parametrize(("content", "status", "code", "details"), BAD_INPUT)
def test_bad_input_is_a_4xx_json_error_and_stores_nothing(
    api: Api, content: bytes | Chunked, status: int, code: str, details: dict[str, Any]
) -> None:
    stored = row_count(api.db)
    if isinstance(content, Chunked):
        data = content.data
        chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
        response = api.client.post("/timers", content=iter(chunks))
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
    else:
        response = api.client.post("/timers", content=content)

    error = assert_error(response, status, code)

    assert {k: error.get(k) for k in details} == details
    assert row_count(api.db) == stored


# routes


@pytest.mark.parametrize("path", ["/", "/nope", "/timers/0123456789abcdef01234567/x", "/timer"])
def test_unknown_route_is_404_json(api: Api, path: str) -> None:
    assert_error(api.client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/timers", {"GET", "POST"}),
        ("DELETE", "/timers", {"GET", "POST"}),
        ("GET", "/timers/0123456789abcdef01234567/replay", {"POST"}),
        ("PUT", "/timers/0123456789abcdef01234567", {"GET", "PATCH", "DELETE"}),
        ("POST", "/timers/0123456789abcdef01234567", {"GET", "PATCH", "DELETE"}),
        ("POST", "/healthz", {"GET"}),
    ],
)
def test_wrong_method_is_405_json_with_allow(
    api: Api, method: str, path: str, allowed: set[str]
) -> None:
    response = api.client.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"} == allowed


# payload, headers, attempt budget; listing; replay


def test_create_keeps_payload_headers_and_max_attempts(api: Api) -> None:
    payload = {"order": 42, "note": "ü ✓", "items": [1, 2.5, None, True, {"k": "v"}]}
    created = api.create(
        seconds=60,
        payload=payload,
        headers={"X-Tenant": "acme", "Authorization": "Bearer t"},
        max_attempts=3,
    )
    stored = api.client.get(f"/timers/{created['id']}").json()
    for view in (created, stored):
        assert view["payload"] == payload
        assert view["headers"] == {"x-tenant": "acme", "authorization": "Bearer t"}
        assert (view["max_attempts"], view["history"], view["next_attempt_at"]) == (3, [], None)


@pytest.mark.parametrize("payload", [None, 0, "text", [], {"a": {"b": [{}]}}])
def test_any_json_value_is_a_payload(api: Api, payload: Any) -> None:
    assert api.create(seconds=60, payload=payload)["payload"] == payload


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"payload": "x" * 9000}, "payload"),
        ({"payload": ["\ud800"]}, "payload"),
        ({"headers": []}, "headers"),
        ({"headers": {"Host": "evil.test"}}, "headers"),
        ({"headers": {"Content-Length": "1"}}, "headers"),
        ({"headers": {"Transfer-Encoding": "chunked"}}, "headers"),
        ({"headers": {"Connection": "close"}}, "headers"),
        ({"headers": {"Webhook-Signature": "v1,forged"}}, "headers"),
        ({"headers": {"x-a": "line\r\nbreak"}}, "headers"),
        ({"headers": {"x-a": 1}}, "headers"),
        ({"headers": {"bad name": "v"}}, "headers"),
        ({"headers": {"X-A": "1", "x-a": "2"}}, "headers"),
        ({"headers": {f"x-{i}": "v" for i in range(21)}}, "headers"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
    ],
)
def test_bad_payload_headers_or_budget_is_422_naming_the_field(
    api: Api, fields: dict[str, Any], field: str
) -> None:
    before = row_count(api.db)
    response = api.client.post("/timers", content=body(seconds=60, **fields))
    error = assert_error(response, 422, "invalid_field")
    assert error["field"] == field
    assert row_count(api.db) == before


def test_failed_timers_are_listed_newest_first_page_by_page(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    db = tmp_path / "timers.db"
    proc = procs.start("api", sqlite_url(db))
    with httpx.Client(base_url=proc.base_url) as client:
        ids = [create(client, seconds=60)["id"] for _ in range(5)]
        for timer_id in ids[:3]:
            put_in_state(db, timer_id, State.FAILED)
        first = client.get("/timers", params={"state": "failed", "limit": 2}).json()
        second = client.get(
            "/timers", params={"state": "failed", "limit": 2, "cursor": first["next_cursor"]}
        ).json()
        everything = client.get("/timers").json()
    assert [t["id"] for t in first["timers"]] == [ids[2], ids[1]]
    assert [t["id"] for t in second["timers"]] == [ids[0]] and second["next_cursor"] is None
    assert {t["state"] for t in first["timers"] + second["timers"]} == {"failed"}
    assert [t["id"] for t in everything["timers"]] == ids[::-1]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "dead"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "nope"}, "cursor"),
    ],
)
def test_a_bad_listing_query_is_422(api: Api, params: dict[str, str], field: str) -> None:
    error = assert_error(api.client.get("/timers", params=params), 422, "invalid_field")
    assert error["field"] == field


@pytest.mark.parametrize("state", [State.FAILED, State.FIRED])
def test_replay_fires_a_finished_timer_again_now_with_the_same_id(api: Api, state: State) -> None:
    timer_id = api.create(seconds=60)["id"]
    put_in_state(api.db, timer_id, state)
    before_ms = now_ms()
    response = api.client.post(f"/timers/{timer_id}/replay")
    assert response.status_code == 200, response.text
    replayed = response.json()
    assert (replayed["id"], replayed["state"], replayed["attempts"]) == (timer_id, "pending", 0)
    assert before_ms <= to_ms(replayed["fire_at"]) <= now_ms()


def test_replay_of_a_pending_or_firing_timer_is_409_and_unknown_is_404(api: Api) -> None:
    pending = api.create(seconds=60)["id"]
    firing = api.create(seconds=60)["id"]
    put_in_state(api.db, firing, None)
    for timer_id, state in ((pending, "pending"), (firing, "firing")):
        assert_error(api.client.post(f"/timers/{timer_id}/replay"), 409, "state_conflict")
        assert api.client.get(f"/timers/{timer_id}").json()["state"] == state
    unknown = "0123456789abcdef01234567"
    assert_error(api.client.post(f"/timers/{unknown}/replay"), 404, "not_found")


# durability, store trouble, configuration (their own servers)


def test_a_201_survives_sigkill_of_the_api(procs: TimerdProcesses, tmp_path: Path) -> None:
    store = sqlite_url(tmp_path / "timers.db")
    first = procs.start("api", store)
    with (
        httpx.Client(base_url=first.base_url, timeout=5.0) as client,
        ThreadPoolExecutor(max_workers=16) as pool,  # concurrent creates share commits
    ):
        created = list(pool.map(lambda i: create(client, minutes=5 + i), range(64)))
    first.kill()

    second = procs.start("api", store)
    with httpx.Client(base_url=second.base_url, timeout=5.0) as client:
        for timer in created:
            read = client.get(f"/timers/{timer['id']}")
            assert read.status_code == 200, read.text
            assert {k: read.json()[k] for k in ("url", "fire_at", "state")} == {
                k: timer[k] for k in ("url", "fire_at", "state")
            }
    assert row_count(tmp_path / "timers.db") == len(created)
    assert second.stop() == 0


def test_a_locked_store_is_a_503_with_retry_after_and_loses_nothing(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    db = tmp_path / "timers.db"
    proc = procs.start("api", sqlite_url(db, busy_timeout_ms="300"))
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        acknowledged = [create(client, hours=1) for _ in range(3)]
        held = acknowledged[0]["id"]

        with closing(sqlite3.connect(db, isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")

            def timed(method: str, path: str, content: bytes | None = None) -> httpx.Response:
                started = time.monotonic()
                response = client.request(method, path, content=content)
                assert time.monotonic() - started < 2.0
                return response

            with ThreadPoolExecutor(max_workers=8) as pool:
                posts = list(pool.map(lambda _: timed("POST", "/timers", body(hours=1)), range(8)))
            cancel = timed("DELETE", f"/timers/{held}")
            read = timed("GET", f"/timers/{held}")
            lock.execute("ROLLBACK")

        for response in [*posts, cancel]:
            assert_error(response, 503, "store_unavailable")
            assert int(response.headers["retry-after"]) >= 1
        assert read.status_code == 200  # WAL: readers are not blocked by a writer's lock

        acknowledged.append(create(client, hours=1))
        for timer in acknowledged:
            assert client.get(f"/timers/{timer['id']}").json()["state"] == "pending"
    assert row_count(db) == len(acknowledged)


def test_a_configured_cap_cannot_be_stretched_past_what_can_be_stored(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    db = tmp_path / "timers.db"
    proc = procs.start("api", sqlite_url(db), args=["--max-delay-s", "1e300"])
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        for fields in ({"hours": 1e200}, {"hours": 1e10}, {"minutes": 1e302}):
            response = client.post("/timers", content=body(**fields))
            assert_error(response, 422, "invalid_field")
        assert row_count(db) == 0

        latest = "9999-12-31T23:59:59.999Z"  # the last instant RFC 3339 can write
        created = client.post("/timers", content=body(fire_at=latest))
        assert created.status_code == 201, created.text
        assert created.json()["fire_at"] == latest
        assert client.get(created.headers["location"]).json()["fire_at"] == latest


@pytest.mark.parametrize(
    ("args", "env", "variable"),
    [
        ([], {"TIMERD_PORT": "abc"}, "TIMERD_PORT"),
        (["--port", "abc"], {}, "TIMERD_PORT"),
        ([], {"TIMERD_PORT": "70000"}, "TIMERD_PORT"),
        (["--store", "foo://x"], {}, "TIMERD_STORE"),
        ([], {"TIMERD_STORE": "foo://x"}, "TIMERD_STORE"),
        ([], {"TIMERD_STORE": "sqlite:///t.db?busy_timeout_ms=soon"}, "TIMERD_STORE"),
        ([], {"TIMERD_MAX_DELAY_S": "nan"}, "TIMERD_MAX_DELAY_S"),
        ([], {"TIMERD_MAX_DELAY_S": "-1"}, "TIMERD_MAX_DELAY_S"),
        ([], {"TIMERD_LOG_LEVEL": "loud"}, "TIMERD_LOG_LEVEL"),
    ],
)
def test_a_bad_setting_exits_non_zero_naming_the_variable(
    tmp_path: Path, args: list[str], env: dict[str, str], variable: str
) -> None:
    result = run_timerd(["api", *args], env=env, cwd=tmp_path)

    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # no store was created


def test_flags_win_over_environment_variables(procs: TimerdProcesses, tmp_path: Path) -> None:
    env_port = free_port()
    env = {
        "TIMERD_PORT": str(env_port),
        "TIMERD_STORE": sqlite_url(tmp_path / "from-env.db"),
        "TIMERD_MAX_DELAY_S": "10",
    }
    proc = procs.start(
        "api", sqlite_url(tmp_path / "from-flag.db"), args=["--max-delay-s", "100"], env=env
    )

    assert proc.port != env_port
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        assert client.post("/timers", content=body(seconds=60)).status_code == 201
        assert_error(client.post("/timers", content=body(seconds=101)), 422, "invalid_field")
    assert row_count(tmp_path / "from-flag.db") == 1
    assert not (tmp_path / "from-env.db").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{env_port}/healthz", timeout=1.0)


def test_environment_variables_apply_without_flags(procs: TimerdProcesses, tmp_path: Path) -> None:
    proc = procs.start("api", sqlite_url(tmp_path / "t.db"), env={"TIMERD_MAX_DELAY_S": "10"})
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        assert_error(client.post("/timers", content=body(seconds=11)), 422, "invalid_field")
        assert client.post("/timers", content=body(seconds=10)).status_code == 201


def test_abuse_limits_are_settings(procs: TimerdProcesses, tmp_path: Path) -> None:
    db = tmp_path / "timers.db"
    limits = {
        "TIMERD_MAX_BODY_BYTES": "600",
        "TIMERD_MAX_URL_CHARS": "40",
        "TIMERD_MAX_PAYLOAD_BYTES": "20",
        "TIMERD_MAX_HEADERS_BYTES": "20",
        "TIMERD_MAX_REQUEST_HEAD_BYTES": "2048",
    }
    proc = procs.start("api", sqlite_url(db), env=limits)
    with httpx.Client(base_url=proc.base_url) as client:
        big_head = {"x-pad": "h" * 2048}
        assert_error(client.get("/timers", headers=big_head), 431, "headers_too_large")
        assert_error(client.post("/timers", content=padded(601)), 413, "body_too_large")
        too_long = {"seconds": 5, "url": "https://example.com/" + "a" * 30}
        assert (
            assert_error(client.post("/timers", json=too_long), 422, "invalid_field")["field"]
            == "url"
        )
        big_payload = {"seconds": 5, "url": "https://x.example", "payload": "p" * 30}
        assert_error(client.post("/timers", json=big_payload), 422, "invalid_field")
        big_headers = {"seconds": 5, "url": "https://x.example", "headers": {"x-a": "v" * 30}}
        assert_error(client.post("/timers", json=big_headers), 422, "invalid_field")
        fits = {"seconds": 5, "url": "https://x.example", "payload": "p", "headers": {"x": "v"}}
        assert client.post("/timers", json=fits).status_code == 201
    assert row_count(db) == 1
