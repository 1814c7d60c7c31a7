"""Hostile inputs against real `timerd run` and `timerd api` processes (issue 15).

Each defect an adversarial run found has its trigger here, with the other triggers of the same
defect beside it: odd `Retry-After` values and hosts delivery cannot encode; numbers that no
finite float holds, at every field of every body; cookies a receiver sets; clients that go away
at each stage of a request; paths with a trailing slash under a hostile `Host`; oversized
request heads. Receivers are real aiohttp servers on 127.0.0.1; nothing here sleeps to wait.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.validation import loads_strict
from tests.support.hostile import NOT_FINITE_NUMBERS, UNDELIVERABLE_URLS
from tests.support.procs import HOST, TimerdProcess, TimerdProcesses, run_timerd
from tests.support.receiver import Answer, Arrival, Receiver
from tests.support.waiting import wait_until

URL = "https://example.com/hooks"
LOOPBACK_AND_LOCALHOST = "127.0.0.0/8,::1/128"  # `localhost` needs both allowed
EDGE_NUMBERS = [  # finite, so accepted, stored, answered and sent as they are
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    -0.0,
    123456789012345678901234567890,
    -123456789012345678901234567890,
]


def sqlite_url(db: Path) -> str:
    return f"sqlite:///{db}"


def row_count(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM timers").fetchone()[0]
        return count


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


@dataclass
class Api:
    proc: TimerdProcess
    db: Path
    client: httpx.Client

    def create(self, **fields: Any) -> str:
        response = self.client.post("/timers", json={"url": URL, "hours": 1, **fields})
        assert response.status_code == 201, response.text
        timer_id: str = response.json()["id"]
        return timer_id


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One `timerd api` (no daemon: nothing fires) on a fresh SQLite file."""
    path = tmp_path_factory.mktemp("hostile")
    db = path / "timers.db"
    with TimerdProcesses(path) as procs:
        proc = procs.start("api", sqlite_url(db))
        with httpx.Client(base_url=proc.base_url, timeout=10.0) as client:
            yield Api(proc, db, client)


# 1. an attempt that raised left its timer firing for ever

RETRY_AFTER_VALUES = [
    "²",  # "²".isdigit() holds, float("²") raises: the trigger found
    "\u0661",  # ARABIC-INDIC DIGIT ONE
    "\uff15",  # FULLWIDTH DIGIT FIVE
    "1e3",
    "-1",
    "1.5",
    "0x10",
    "NaN",
    "inf",
    "9" * 400,
    "Fri, 15 Jan 99999 08:00:00 GMT",
    "Fri, 31 Feb 2027 08:00:00 GMT",
    "Fri, 15 Jan 2027 08:00:00 +9999",
    "",
]


def test_a_503_with_any_retry_after_is_a_retry_never_a_stuck_timer(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    def answer(arrival: Arrival) -> Answer:
        case = int(arrival.path.split("/")[2])
        return Answer(503, (("retry-after", RETRY_AFTER_VALUES[case]),))

    with Receiver(answer) as receiver:
        server = procs.start("run", sqlite_url(tmp_path / "timers.db"))
        with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
            ids = []
            for case in range(len(RETRY_AFTER_VALUES)):
                body = {"url": f"{receiver.url}/{case}", "seconds": 0.001, "payload": EDGE_NUMBERS}
                response = client.post("/timers", json=body)
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
            for case, timer_id in enumerate(ids):

                def retrying(timer_id: str = timer_id) -> dict[str, Any] | None:
                    timer: dict[str, Any] = client.get(f"/timers/{timer_id}").json()
                    waiting = timer["state"] == "pending" and timer["attempts"] >= 1
                    return timer if waiting else None

                timer = wait_until(retrying, 15.0, f"Retry-After {RETRY_AFTER_VALUES[case]!r}")
                assert timer["last_status"] == 503, timer
                assert timer["next_attempt_at"] is not None, timer
        arrivals = receiver.wait_for(len(ids))
    for arrival in arrivals:  # finite numbers at the edge of a float arrive as valid JSON
        assert loads_strict(arrival.body)["payload"] == EDGE_NUMBERS
    assert "delivery_error" not in server.stderr(), server.stderr()


@pytest.mark.parametrize(("name", "url"), UNDELIVERABLE_URLS.items(), ids=UNDELIVERABLE_URLS)
def test_a_url_no_delivery_can_reach_is_refused_at_create_and_patch(
    api: Api, name: str, url: str
) -> None:
    timer_id = api.create()
    before = api.client.get(f"/timers/{timer_id}").json()
    stored = row_count(api.db)

    created = api.client.post("/timers", json={"url": url, "seconds": 1})
    patched = api.client.patch(f"/timers/{timer_id}", json={"url": url})

    assert assert_error(created, 422, "invalid_field")["field"] == "url", name
    assert assert_error(patched, 422, "invalid_field")["field"] == "url", name
    assert row_count(api.db) == stored
    assert api.client.get(f"/timers/{timer_id}").json() == before


# 2. a number too large for a float was stored and poisoned the tenant

# Where a number can sit in a body: `{}` is replaced by the number's literal.
NUMBER_PLACES = {
    "payload": '"payload": {}',
    "payload-in-object": '"payload": {{"a": [1, {{"b": {}}}]}}',
    "payload-in-array": '"payload": [0, {}]',
    "hours": '"hours": {}',
    "minutes": '"minutes": {}',
    "seconds": '"seconds": {}',
    "max_attempts": '"max_attempts": {}',
    "url": '"url": {}',
    "fire_at": '"fire_at": {}',
    "headers": '"headers": {{"x-a": {}}}',
    "unknown-field": '"unknown": {}',
}
CREATE = '{{"url": "https://example.com/hooks", "seconds": 60, {}}}'
PATCH = "{{{}}}"


@pytest.mark.parametrize("place", NUMBER_PLACES)
@pytest.mark.parametrize("number", NOT_FINITE_NUMBERS)
def test_a_number_no_finite_float_holds_is_400_anywhere_and_stores_nothing(
    api: Api, place: str, number: str
) -> None:
    timer_id = api.create()
    before = api.client.get(f"/timers/{timer_id}").json()
    stored = row_count(api.db)
    field = NUMBER_PLACES[place].format(NOT_FINITE_NUMBERS[number])
    headers = {"content-type": "application/json"}

    created = api.client.post("/timers", content=CREATE.format(field), headers=headers)
    patched = api.client.patch(f"/timers/{timer_id}", content=PATCH.format(field), headers=headers)

    assert_error(created, 400, "invalid_json")
    assert_error(patched, 400, "invalid_json")
    assert row_count(api.db) == stored
    assert api.client.get(f"/timers/{timer_id}").json() == before
    assert api.client.get("/timers").status_code == 200


def test_numbers_at_the_edge_of_a_float_are_kept_exactly(api: Api) -> None:
    timer_id = api.create(payload=EDGE_NUMBERS)
    assert api.client.get(f"/timers/{timer_id}").json()["payload"] == EDGE_NUMBERS
    patched = api.client.patch(f"/timers/{timer_id}", json={"payload": {"n": EDGE_NUMBERS}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["payload"] == {"n": EDGE_NUMBERS}


@pytest.mark.parametrize(
    "stored",
    [
        "Infinity",
        "NaN",
        "[1e400]",
        '{"a": -Infinity}',
        "{",
        "",
        "1" * 5000,
        '"\\ud800"',
        "[" * 2000,
    ],
)
def test_a_stored_payload_that_is_not_json_never_fails_a_read_or_a_listing(
    api: Api, stored: str
) -> None:
    timer_id = api.create(payload=1)
    with closing(sqlite3.connect(api.db)) as conn, conn:  # as a timer stored before the fix
        conn.execute("UPDATE timers SET payload = ? WHERE id = ?", (stored, timer_id))

    read = api.client.get(f"/timers/{timer_id}")
    listed = api.client.get("/timers", params={"limit": 100})

    assert read.status_code == 200, read.text
    assert isinstance(read.json()["payload"], str)  # shown as the text it is
    assert listed.status_code == 200, listed.text
    assert timer_id in {t["id"] for t in listed.json()["timers"]}


# 3. cookies set by one receiver rode along on later webhooks, across tenants


def test_no_webhook_carries_a_cookie_a_receiver_set(procs: TimerdProcesses, tmp_path: Path) -> None:
    db = tmp_path / "timers.db"
    tokens = {}
    for tenant in ("alpha", "beta"):
        made = run_timerd(["keys", "create", "--name", tenant, "--store", sqlite_url(db)])
        assert made.returncode == 0, made.stderr
        tokens[tenant] = made.stdout.strip()
    cookies = (
        ("set-cookie", "session=alpha-secret; Path=/"),
        ("set-cookie", "wide=1; Domain=localhost; Path=/; Max-Age=3600"),
        ("set-cookie", "strict=1; Path=/hooks; HttpOnly; SameSite=Strict"),
        ("set-cookie2", 'legacy="1"; Version="1"; Path="/"'),
    )
    env = {"TIMERD_ALLOWED_NETWORKS": LOOPBACK_AND_LOCALHOST, "TIMERD_AUTH": "keys"}
    # A host name: a cookie jar keeps no cookie from an IP address, so 127.0.0.1 hides the bug.
    with Receiver(lambda _: Answer(200, cookies), host="localhost") as receiver:
        server = procs.start("run", sqlite_url(db), env=env)
        with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
            sent = [
                ("alpha", {}),
                ("beta", {}),
                ("alpha", {}),
                ("beta", {"cookie": "own=beta"}),  # the timer's own cookie header is sent
            ]
            for count, (tenant, headers) in enumerate(sent, start=1):
                auth = {"authorization": f"Bearer {tokens[tenant]}"}
                body = {"url": receiver.url, "seconds": 0.001, "headers": headers}
                assert client.post("/timers", json=body, headers=auth).status_code == 201
                receiver.wait_for(count)  # one at a time: each after the cookies were set
        arrivals = receiver.wait_for(len(sent))
    assert [a.headers.get("cookie") for a in arrivals] == [None, None, None, "own=beta"]
    assert not any("cookie2" in a.headers for a in arrivals)


# 4. a client that went away counted as a server error


def requests_counted(base_url: str) -> Counter[tuple[str, str, str]]:
    """`timerd_api_requests_total` by (route, method, status)."""
    counted: Counter[tuple[str, str, str]] = Counter()
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "timerd_api_requests_total":
                labels = sample.labels
                counted[labels["route"], labels["method"], labels["status"]] += int(sample.value)
    return counted


def send_and_leave(port: int, data: bytes, *, reset: bool = False) -> None:
    """Send `data` on a new connection to the API and go away (with a reset when `reset`)."""
    with socket.create_connection((HOST, port), timeout=5.0) as sock:
        sock.sendall(data)
        if reset:  # SO_LINGER 0: close() sends RST rather than FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def head(method: str, path: str, *lines: str) -> bytes:
    return "".join([f"{method} {path} HTTP/1.1\r\nHost: timerd\r\n", *lines, "\r\n"]).encode()


CREATE_BODY = json.dumps({"url": URL, "seconds": 60}).encode()


def disconnect_stages(timer_id: str) -> dict[str, tuple[bytes, str, str, set[str]]]:
    """Each stage at which a client goes away: what it sends, and the route, method and
    statuses its request may be counted under (none: the app never saw it)."""
    json_type = "Content-Type: application/json\r\n"
    timer = f"/timers/{timer_id}"
    return {
        "during-the-request-line": (b"POST /tim", "", "", set()),
        "during-the-headers": (b"POST /timers HTTP/1.1\r\nHost: t\r\nContent-Le", "", "", set()),
        "during-a-sized-body": (
            head("POST", "/timers", json_type, "Content-Length: 1000\r\n") + b'{"url": "ht',
            "/timers",
            "POST",
            {"499"},
        ),
        "during-a-chunked-body": (
            head("POST", "/timers", json_type, "Transfer-Encoding: chunked\r\n") + b'5\r\n{"url',
            "/timers",
            "POST",
            {"499"},
        ),
        "during-a-patch-body": (
            head("PATCH", timer, json_type, "Content-Length: 500\r\n") + b'{"minu',
            "/timers/{timer_id}",
            "PATCH",
            {"499"},
        ),
        "before-the-answer": (
            head("POST", "/timers", json_type, f"Content-Length: {len(CREATE_BODY)}\r\n")
            + CREATE_BODY,
            "/timers",
            "POST",
            {"201", "499"},
        ),
        "during-the-answer": (head("GET", "/timers?limit=100"), "/timers", "GET", {"200"}),
    }


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize(
    "stage",
    [
        "during-the-request-line",
        "during-the-headers",
        "during-a-sized-body",
        "during-a-chunked-body",
        "during-a-patch-body",
        "before-the-answer",
        "during-the-answer",
    ],
)
def test_a_client_that_goes_away_is_no_server_error(api: Api, stage: str, reset: bool) -> None:
    for _ in range(20):  # a page to answer
        api.create()
    data, route, method, statuses = disconnect_stages(api.create())[stage]
    before = requests_counted(api.proc.base_url)
    logged_before = len(api.proc.stderr())

    send_and_leave(api.proc.port, data, reset=reset)

    if statuses:

        def counted() -> Counter[tuple[str, str, str]]:
            now = requests_counted(api.proc.base_url)
            return Counter({k: v for k, v in (now - before).items() if k[:2] == (route, method)})

        [(key, _)] = wait_until(counted, 10.0, f"the request {stage} to be counted").items()
        assert key[2] in statuses, key
    since = requests_counted(api.proc.base_url) - before  # one more request answered after it
    assert not [k for k in since if k[2].startswith("5")], since
    log = api.proc.stderr()[logged_before:]
    for sign in ("unexpected_error", "Traceback", "Exception in ASGI application"):
        assert sign not in log, log


# 5. a trailing slash redirected to the Host header


@pytest.mark.parametrize(
    "path",
    [
        "/timers/",
        "/timers//",
        "//timers",
        "/healthz/",
        "/readyz/",
        "/metrics/",
        "/openapi.json/",
        "/timers/0123456789abcdef01234567/",
        "/timers/0123456789abcdef01234567/replay/",
        "/timers/0123456789abcdef01234567//replay",
        "/timers/?limit=1",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_no_path_redirects_or_reflects_the_host_header(api: Api, path: str, method: str) -> None:
    evil = "evil.example"
    response = api.client.request(
        method, path, headers={"host": evil, "x-forwarded-host": evil}, json={"seconds": 1}
    )
    assert not 300 <= response.status_code < 400, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert not any(evil in value for value in response.headers.values())
    assert evil not in response.text
    if method != "HEAD":
        assert_error(response, response.status_code, response.json()["error"]["code"])
        assert response.status_code in {404, 405}, response.text


# request heads have a size limit


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        pytest.param({"x-big": "a" * 1024 * 1024}, "/healthz", id="one-1mb-header"),
        pytest.param({f"x-h{i}": "a" * 100 for i in range(170)}, "/healthz", id="many-headers"),
        pytest.param({"cookie": "c=" + "a" * 17_000}, "/timers", id="a-long-cookie"),
        pytest.param({}, "/timers?cursor=" + "a" * 17_000, id="a-long-request-line"),
    ],
)
def test_a_request_head_over_the_limit_is_a_json_431(
    api: Api, headers: dict[str, str], target: str
) -> None:
    response = api.client.get(target, headers=headers)
    assert_error(response, 431, "headers_too_large")


def test_a_request_head_within_the_limit_is_answered(api: Api) -> None:
    headers = {f"x-h{i}": "a" * 100 for i in range(120)}  # about 13 KiB
    assert api.client.get("/timers", headers=headers).status_code == 200
