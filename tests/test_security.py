"""Security of the HTTP API against real `timerd api` processes on temporary SQLite files.

API keys and protected mode, tenants kept apart, idempotent creates, PATCH, the per-tenant cap,
the per-key rate limit, and error bodies that leak nothing. Most tests share two API replicas on
one file (module scope); those that need other settings or change the keys start their own.
Nothing sleeps to synchronise: every wait is on an answer, an exit or a bounded deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import PendingCap
from api.auth import KEYS_EXIST_CACHE_S, check_protected_mode
from tests.support.procs import HOST, TimerdProcess, TimerdProcesses, run_timerd
from tests.support.timers import put_in_state
from tests.support.waiting import wait_until
from timerd import keys
from timerd.errors import ConfigError
from timerd.models import State
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.sqlite import SqliteStore

URL = "https://example.com/hooks"
MISSING_ID = "0123456789abcdef01234567"  # well formed, never created
TOKEN = re.compile(r"tmr_([0-9a-f]{16})_([A-Za-z0-9_-]+)")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# helpers


def sqlite_url(path: Path, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_ms(rfc3339: str) -> int:
    moment = datetime.fromisoformat(rfc3339)
    return (moment - EPOCH) // timedelta(milliseconds=1)


def body(**fields: Any) -> bytes:
    return json.dumps({"url": URL, **fields}).encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cli_key(db: Path, name: str, tenant: str | None = None) -> str:
    """`timerd keys create`: exactly one token on stdout, which is returned."""
    args = ["keys", "create", "--name", name, "--store", sqlite_url(db)]
    result = run_timerd([*args, "--tenant", tenant] if tenant else args)
    assert result.returncode == 0, result.stderr
    assert TOKEN.fullmatch(result.stdout.removesuffix("\n")), result.stdout
    assert result.stdout.count("\n") == 1
    return result.stdout.strip()


def cli(db: Path, *args: str) -> tuple[int, str, str]:
    result = run_timerd([*args, "--store", sqlite_url(db)])
    return result.returncode, result.stdout, result.stderr


def store_key(db: Path, tenant: str, *, revoked: bool = False) -> str:
    """A key made in-process (quicker than the CLI where the CLI is not under test)."""
    store = SqliteStore(str(db))
    try:
        token, record = keys.new_key(tenant, tenant, now_ms())
        store.add_key(record)
        if revoked:
            assert store.revoke_key(record.key_id, now_ms())
    finally:
        store.close()
    return token


def key_id(token: str) -> str:
    match = TOKEN.fullmatch(token)
    assert match is not None
    return match[1]


def rows(db: Path, where: str = "1", params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(f"SELECT * FROM timers WHERE {where}", params).fetchall()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    timer: dict[str, Any] = response.json()
    return timer


def stable(view: dict[str, Any]) -> dict[str, Any]:
    """A timer's view without `time_left`, which moves with the clock."""
    return {k: v for k, v in view.items() if k != "time_left"}


HOSTNAME = socket.gethostname()
LEAKS = [
    (re.compile(r"Traceback|File \""), "a traceback"),
    (re.compile(r"[\w.~-]*/[\w./~-]*\.py\b"), "a path to a .py file"),
    (re.compile(r"site-packages|/usr/|/home/|/work/|/tmp/"), "a file path"),
    (re.compile(r"sqlite|pymongo|aiohttp|starlette|uvicorn", re.I), "a driver name"),
    (
        re.compile(r"OperationalError|IntegrityError|database is locked|no such", re.I),
        "driver text",
    ),
    (re.compile(rf"(?<![\w-]){re.escape(HOSTNAME)}(?![\w-])", re.I), "the host name"),
]


def assert_leaks_nothing(response: httpx.Response) -> None:
    """An error answer is JSON and holds no traceback, path, driver name or host name."""
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"] == "application/json", response.text
    assert set(response.json()) == {"error"}
    for pattern, what in LEAKS:
        assert not pattern.search(response.text), (
            f"{what} in a {response.status_code}: {response.text}"
        )


@dataclass
class Replicas:
    """Two `timerd api` replicas on one SQLite file, with keys of tenants acme and globex."""

    db: Path
    procs: list[TimerdProcess]
    tokens: dict[str, str]
    _clients: dict[tuple[str | None, int], httpx.Client] = field(default_factory=dict)

    def client(self, tenant: str | None, replica: int = 0) -> httpx.Client:
        """A client of `replica` that authenticates as `tenant` (None: no key at all)."""
        if (tenant, replica) not in self._clients:
            headers = bearer(self.tokens[tenant]) if tenant else {}
            self._clients[tenant, replica] = httpx.Client(
                base_url=self.procs[replica].base_url, headers=headers, timeout=5.0
            )
        return self._clients[tenant, replica]

    def create(self, tenant: str, replica: int = 0, **fields: Any) -> dict[str, Any]:
        fields = fields or {"hours": 1}
        return created(self.client(tenant, replica).post("/timers", content=body(**fields)))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    path = tmp_path_factory.mktemp("security")
    db = path / "timers.db"
    with ThreadPoolExecutor(max_workers=2) as pool:
        acme = pool.submit(cli_key, db, "acme-ci", "acme")
        globex = pool.submit(cli_key, db, "globex")  # the tenant defaults to the name
        tokens = {"acme": acme.result(), "globex": globex.result()}
    tokens["revoked"] = store_key(db, "acme", revoked=True)
    with TimerdProcesses(path) as procs:
        started = [procs.start("api", sqlite_url(db)) for _ in range(2)]
        cluster = Replicas(db, started, tokens)
        try:
            yield cluster
        finally:
            cluster.close()


# 1. API keys


def test_keys_create_prints_the_token_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    db = tmp_path / "timers.db"
    result = run_timerd(["keys", "create", "--name", "ci", "--store", sqlite_url(db)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    match = TOKEN.fullmatch(lines[0])
    assert match is not None, result.stdout
    token, kid, secret = lines[0], match[1], match[2]
    assert len(secret) >= 32
    assert secret not in result.stderr

    code, listing, errors = cli(db, "keys", "list")
    assert code == 0, errors
    assert re.fullmatch(rf"{kid}\s+live\s+tenant=ci\s+name=ci\n", listing), listing
    assert secret not in listing + errors

    with closing(sqlite3.connect(db)) as conn:
        stored = conn.execute("SELECT * FROM api_keys").fetchall()
        columns = [c[1] for c in conn.execute("PRAGMA table_info(api_keys)")]
    assert len(stored) == 1
    texts = [value for value in stored[0] if isinstance(value, str)]
    assert kid in texts
    assert dict(zip(columns, stored[0], strict=True))["secret_hash"] == (
        hashlib.sha256(secret.encode()).hexdigest()
    )
    raw_secret = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    for text in texts:
        assert secret not in text
        assert token not in text
    files = [p for p in tmp_path.iterdir() if p.name.startswith("timers.db")]
    assert db in files
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data, path
        assert raw_secret not in data, path

    code, _, errors = cli(db, "keys", "revoke", kid)
    assert code == 0, errors
    code, listing, errors = cli(db, "keys", "list")
    assert re.fullmatch(rf"{kid}\s+revoked\s+tenant=ci\s+name=ci\n", listing), listing


def _bad_authorizations(replicas: Replicas) -> dict[str, dict[str, str]]:
    acme = replicas.tokens["acme"]
    kid = key_id(acme)
    secret = acme.removeprefix(f"tmr_{kid}_")
    other_secret = keys.new_key("x", "x", 0)[0].removeprefix("tmr_")[17:]
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "scheme-only": {"Authorization": "Bearer"},
        "garbage": {"Authorization": "Bearer hello"},
        "prefix-only": {"Authorization": "Bearer tmr_"},
        "no-secret": {"Authorization": f"Bearer tmr_{kid}_"},
        "short-key-id": {"Authorization": f"Bearer tmr_{kid[:-1]}_{secret}"},
        "no-prefix": {"Authorization": f"Bearer {kid}_{secret}"},
        "secret-only": {"Authorization": f"Bearer {secret}"},
        "wrong-secret": bearer(f"tmr_{kid}_{other_secret}"),
        "secret-with-suffix": bearer(acme + "x"),
        "truncated-secret": bearer(acme[:-1]),
        "unknown-key-id": bearer(f"tmr_{'0' * 16}_{secret}"),
        "basic-scheme": {"Authorization": "Basic " + base64.b64encode(acme.encode()).decode()},
        "token-scheme": {"Authorization": f"Token {acme}"},
        "no-scheme": {"Authorization": acme},
        "revoked": bearer(replicas.tokens["revoked"]),
    }


def test_every_bad_key_is_the_same_401_on_every_route(replicas: Replicas) -> None:
    timer = replicas.create("acme")
    before = replicas.client("acme").get(f"/timers/{timer['id']}").json()
    count = len(rows(replicas.db))
    requests = [
        ("GET", "/timers", None),
        ("GET", "/timers?state=pending", None),
        ("POST", "/timers", body(hours=1)),
        ("POST", "/timers", b"not json"),
        ("GET", f"/timers/{timer['id']}", None),
        ("GET", f"/timers/{MISSING_ID}", None),
        ("GET", "/timers/xyz", None),
        ("PATCH", f"/timers/{timer['id']}", json.dumps({"seconds": 5}).encode()),
        ("PATCH", f"/timers/{MISSING_ID}", b"{}"),
        ("DELETE", f"/timers/{timer['id']}", None),
        ("DELETE", f"/timers/{MISSING_ID}", None),
        ("POST", f"/timers/{timer['id']}/replay", None),
    ]
    bodies: set[bytes] = set()
    for name, headers in _bad_authorizations(replicas).items():
        for replica in (0, 1):
            client = replicas.client(None, replica)
            for method, path, content in requests:
                response = client.request(method, path, content=content, headers=headers)
                where = f"{name}: {method} {path} on replica {replica}"
                assert response.status_code == 401, f"{where}: {response.text}"
                assert response.headers["www-authenticate"].split()[0] == "Bearer", where
                assert response.headers["content-type"] == "application/json", where
                bodies.add(response.content)
    assert len(bodies) == 1, bodies
    assert json.loads(bodies.pop())["error"]["code"] == "unauthorized"

    after = replicas.client("acme", 1).get(f"/timers/{timer['id']}")  # a valid key works
    assert after.status_code == 200, after.text
    assert stable(after.json()) == stable(before)
    assert len(rows(replicas.db)) == count


def test_revocation_applies_to_the_next_request_on_every_replica(replicas: Replicas) -> None:
    doomed = store_key(replicas.db, "acme")
    clients = [
        httpx.Client(base_url=p.base_url, headers=bearer(doomed), timeout=5.0)
        for p in replicas.procs
    ]
    try:
        for client in clients:
            assert client.get("/timers").status_code == 200

        code, _, errors = cli(replicas.db, "keys", "revoke", key_id(doomed))
        assert code == 0, errors

        for client in clients:  # the very next request, on each replica
            response = client.get("/timers")
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].split()[0] == "Bearer"
            assert_error(client.post("/timers", content=body(hours=1)), 401, "unauthorized")
    finally:
        for client in clients:
            client.close()
    for replica in (0, 1):  # other keys are untouched
        assert replicas.client("acme", replica).get("/timers").status_code == 200


def test_the_first_key_makes_an_open_loopback_api_require_keys(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    db = tmp_path / "timers.db"
    proc = procs.start("api", sqlite_url(db))
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        assert client.get("/timers").status_code == 200  # no key exists: open on loopback
        anonymous = created(client.post("/timers", content=body(hours=1)))

        token = store_key(db, "first")  # as `timerd keys create` would, from another connection
        made = time.monotonic()
        wait_until(
            lambda: client.get("/timers").status_code == 401,
            5.0,
            "requests without a key to be refused once a key exists",
        )
        assert time.monotonic() - made < 3.0  # "within a few seconds": ~2 s

        assert_error(client.get("/timers", headers=bearer(token + "x")), 401, "unauthorized")
        keyed = client.get("/timers", headers=bearer(token))
        assert keyed.status_code == 200, keyed.text
        assert keyed.json()["timers"] == []  # the anonymous timer is no tenant's
        assert_error(
            client.get(f"/timers/{anonymous['id']}", headers=bearer(token)), 404, "not_found"
        )


def test_revoking_the_last_key_does_not_reopen_the_api(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    db = tmp_path / "timers.db"
    token = store_key(db, "only")
    proc = procs.start("api", sqlite_url(db))
    with httpx.Client(base_url=proc.base_url, timeout=5.0) as client:
        assert client.get("/timers", headers=bearer(token)).status_code == 200
        assert_error(client.get("/timers"), 401, "unauthorized")

        store = SqliteStore(str(db))  # as `timerd keys revoke` would
        try:
            assert store.revoke_key(key_id(token), now_ms())
        finally:
            store.close()

        # Watch past the API's cache of "does any key exist?": a revoked key, or none, must
        # stay refused, not fall back to open loopback mode.
        deadline = time.monotonic() + max(KEYS_EXIST_CACHE_S, 2.0) + 0.5
        while time.monotonic() < deadline:
            for headers in (bearer(token), {}):
                response = client.get("/timers", headers=headers)
                assert response.status_code == 401, (headers, response.text)


# 2. protected mode


@pytest.mark.parametrize(
    ("keys_present", "use_env"),
    [
        pytest.param(None, False, id="no-keys-flag"),
        pytest.param(None, True, id="no-keys-env"),
        pytest.param("revoked", False, id="only-a-revoked-key"),
    ],
)
def test_no_keys_on_a_non_loopback_address_refuses_to_start(
    tmp_path: Path, keys_present: str | None, use_env: bool
) -> None:
    db = tmp_path / "timers.db"
    if keys_present:
        store_key(db, "old", revoked=True)
    # Hold the port on loopback: were timerd to go on and bind 0.0.0.0 it would fail (exit 1),
    # so no test server ever listens beyond loopback.
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        port = str(held.getsockname()[1])
        args = ["api", "--port", port, "--store", sqlite_url(db)]
        if use_env:
            result = run_timerd(args, env={"TIMERD_HOST": "0.0.0.0"})
        else:
            result = run_timerd([*args, "--host", "0.0.0.0"])

    assert result.returncode == 2, result.stderr
    assert "TIMERD_AUTH" in result.stderr
    assert "timerd keys create" in result.stderr  # what to do
    assert "TIMERD_AUTH=none" in result.stderr
    assert "Traceback" not in result.stderr
    assert "api_starting" not in result.stderr + result.stdout
    assert "address already in use" not in result.stderr.lower()


@pytest.fixture
def key_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = open_store(sqlite_url(tmp_path / "keys.db"))
    assert isinstance(store, SqliteStore)
    try:
        yield store
    finally:
        store.close()


@pytest.mark.parametrize(
    ("host", "auth", "key"),
    [
        ("0.0.0.0", "auto", "live"),
        ("::", "auto", "live"),
        ("0.0.0.0", "none", None),
        ("::", "none", None),
        ("192.0.2.10", "none", "revoked"),
        ("127.0.0.1", "auto", None),
        ("127.0.0.2", "auto", None),
        ("::1", "auto", None),
        ("localhost", "auto", None),
        ("127.0.0.1", "auto", "revoked"),
    ],
)
def test_protected_mode_allows(
    key_store: SqliteStore, host: str, auth: str, key: str | None
) -> None:
    if key is not None:
        _, record = keys.new_key("k", "t", now_ms())
        key_store.add_key(record)
        if key == "revoked":
            assert key_store.revoke_key(record.key_id, now_ms())
    check_protected_mode(Settings(host=host, auth=auth), key_store)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("0.0.0.0", None),
        ("::", None),
        ("192.0.2.10", None),
        ("example.com", None),
        ("0.0.0.0", "revoked"),
    ],
)
def test_protected_mode_refuses(key_store: SqliteStore, host: str, key: str | None) -> None:
    if key is not None:
        _, record = keys.new_key("k", "t", now_ms())
        key_store.add_key(record)
        assert key_store.revoke_key(record.key_id, now_ms())
    with pytest.raises(ConfigError, match="TIMERD_AUTH"):
        check_protected_mode(Settings(host=host, auth="auto"), key_store)


# 3. tenants


def test_another_tenants_timer_is_exactly_a_missing_one(replicas: Replicas) -> None:
    acme = replicas.client("acme")
    globex = replicas.client("globex", 1)
    pending = replicas.create("acme", hours=1)["id"]
    failed = replicas.create("acme", fire_at="2001-01-01T00:00:00Z")["id"]
    put_in_state(replicas.db, failed, State.FAILED)
    own = {i: acme.get(f"/timers/{i}").json() for i in (pending, failed)}
    assert own[failed]["state"] == "failed"
    stored = {i: dict(rows(replicas.db, "id = ?", (i,))[0]) for i in (pending, failed)}

    patch = json.dumps({"seconds": 5, "url": "https://evil.example/"}).encode()
    operations = [
        ("GET", "/timers/{}", None),
        ("DELETE", "/timers/{}", None),
        ("PATCH", "/timers/{}", patch),
        ("POST", "/timers/{}/replay", None),
    ]
    for method, template, content in operations:
        missing = globex.request(method, template.format(MISSING_ID), content=content)
        assert_error(missing, 404, "not_found")
        for timer_id in (pending, failed):
            response = globex.request(method, template.format(timer_id), content=content)
            assert response.status_code == 404, (method, response.text)
            assert response.content == missing.content, method
            assert response.headers["content-type"] == missing.headers["content-type"]

    for query in ("", "?state=pending", "?state=failed", "?limit=100"):
        listed = globex.get(f"/timers{query}")
        assert listed.status_code == 200
        assert not {t["id"] for t in listed.json()["timers"]} & {pending, failed}, query
    mine = {t["id"] for t in acme.get("/timers?limit=100").json()["timers"]}
    assert {pending, failed} <= mine

    for timer_id in (pending, failed):  # nothing of acme's changed
        assert stable(acme.get(f"/timers/{timer_id}").json()) == stable(own[timer_id])
        assert dict(rows(replicas.db, "id = ?", (timer_id,))[0]) == stored[timer_id]

    moved = acme.patch(f"/timers/{pending}", content=json.dumps({"minutes": 30}).encode())
    assert moved.status_code == 200, moved.text
    replayed = acme.post(f"/timers/{failed}/replay")
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["state"] == "pending"
    cancelled = acme.delete(f"/timers/{pending}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"


# 4. idempotency


def test_an_idempotent_retry_returns_the_original_timer(replicas: Replicas) -> None:
    key = f"order-{uuid.uuid4()}"
    first_body = json.dumps({"url": URL, "seconds": 600, "payload": {"a": 1, "b": [2, 3]}})
    reordered = f'{{ "payload" : {{"b": [2, 3], "a": 1}},\n "seconds": 600, "url": "{URL}" }}'

    first = replicas.client("acme", 0).post(
        "/timers", content=first_body, headers={"Idempotency-Key": key}
    )
    original = created(first)
    assert "idempotent-replayed" not in first.headers
    for replica, content in ((1, reordered), (0, first_body), (1, first_body)):
        again = replicas.client("acme", replica).post(
            "/timers", content=content, headers={"Idempotency-Key": key}
        )
        assert stable(created(again)) == stable(original)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["location"] == f"/timers/{original['id']}"
    assert len(rows(replicas.db, "idempotency_key = ?", (key,))) == 1

    different = json.dumps({"url": URL, "seconds": 601, "payload": {"a": 1, "b": [2, 3]}})
    conflict = replicas.client("acme", 1).post(
        "/timers", content=different, headers={"Idempotency-Key": key}
    )
    assert_error(conflict, 422, "idempotency_conflict")
    assert len(rows(replicas.db, "idempotency_key = ?", (key,))) == 1

    other = replicas.client("globex").post(
        "/timers", content=first_body, headers={"Idempotency-Key": key}
    )
    theirs = created(other)
    assert theirs["id"] != original["id"]
    assert "idempotent-replayed" not in other.headers
    stored = rows(replicas.db, "idempotency_key = ?", (key,))
    assert sorted(r["tenant"] for r in stored) == ["acme", "globex"]
    assert replicas.client("globex").get(f"/timers/{original['id']}").status_code == 404


def test_concurrent_retries_on_two_replicas_make_one_timer(replicas: Replicas) -> None:
    key = f"burst-{uuid.uuid4()}"
    content = body(minutes=5, payload={"n": 1})
    threads = 16
    barrier = threading.Barrier(threads)
    clients = [
        httpx.Client(
            base_url=replicas.procs[i % 2].base_url,
            headers={**bearer(replicas.tokens["acme"]), "Idempotency-Key": key},
            timeout=10.0,
        )
        for i in range(threads)
    ]

    def post(client: httpx.Client) -> httpx.Response:
        assert client.get("/healthz").status_code == 200  # connected before the barrier
        barrier.wait(timeout=10)
        return client.post("/timers", content=content)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            responses = list(pool.map(post, clients))
    finally:
        for client in clients:
            client.close()

    ids = {created(r)["id"] for r in responses}
    assert len(ids) == 1, ids
    fresh = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    assert all(r.headers["idempotent-replayed"] == "true" for r in responses if r not in fresh)
    stored = rows(replicas.db, "idempotency_key = ?", (key,))
    assert [r["id"] for r in stored] == list(ids)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("k" * 256, id="256-chars"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a b", id="space"),
        pytest.param(b"caf\xe9", id="non-ascii"),
    ],
)
def test_a_bad_idempotency_key_is_400(replicas: Replicas, value: str | bytes) -> None:
    count = len(rows(replicas.db))
    response = replicas.client("acme").post(
        "/timers", content=body(hours=1), headers={"Idempotency-Key": value}
    )
    assert_error(response, 400, "invalid_idempotency_key")
    assert len(rows(replicas.db)) == count


def test_an_idempotency_key_with_a_control_character_stores_nothing(replicas: Replicas) -> None:
    count = len(rows(replicas.db))
    content = body(hours=1)
    head = (
        f"POST /timers HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
        f"Authorization: Bearer {replicas.tokens['acme']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\nIdempotency-Key: a\x01b\r\n\r\n"
    )
    with socket.create_connection((HOST, replicas.procs[0].port), timeout=5.0) as conn:
        conn.sendall(head.encode() + content)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert len(rows(replicas.db)) == count


def test_an_idempotency_key_of_255_visible_characters_is_accepted(replicas: Replicas) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F)) + uuid.uuid4().hex
    key = (key * 3)[:255]
    first = replicas.client("acme").post(
        "/timers", content=body(hours=2), headers={"Idempotency-Key": key}
    )
    again = replicas.client("acme", 1).post(
        "/timers", content=body(hours=2), headers={"Idempotency-Key": key}
    )
    assert created(first)["id"] == created(again)["id"]
    assert again.headers["idempotent-replayed"] == "true"


# 5. PATCH


def _patch(replicas: Replicas, timer_id: str, change: Any, replica: int = 0) -> httpx.Response:
    content = json.dumps(change).encode()
    return replicas.client("acme", replica).patch(f"/timers/{timer_id}", content=content)


def _get(replicas: Replicas, timer_id: str, replica: int = 0) -> dict[str, Any]:
    response = replicas.client("acme", replica).get(f"/timers/{timer_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def test_patch_moves_the_due_time_from_now_or_to_fire_at(replicas: Replicas) -> None:
    timer = replicas.create("acme", hours=3)
    before = now_ms()
    moved = _patch(replicas, timer["id"], {"minutes": 1, "seconds": 30.5})
    after = now_ms()
    assert moved.status_code == 200, moved.text
    due = to_ms(moved.json()["fire_at"])
    assert before + 90_500 <= due <= after + 90_500
    read = _get(replicas, timer["id"], 1)
    assert (read["id"], read["state"], to_ms(read["fire_at"])) == (timer["id"], "pending", due)
    assert 90 <= read["time_left"] <= 91

    target_ms = now_ms() + 2 * 86_400_000
    local = (EPOCH + timedelta(milliseconds=target_ms)).astimezone(timezone(timedelta(hours=2)))
    moved = _patch(replicas, timer["id"], {"fire_at": local.isoformat(timespec="milliseconds")})
    assert moved.status_code == 200, moved.text
    read = _get(replicas, timer["id"])
    assert to_ms(read["fire_at"]) == target_ms
    assert read["fire_at"].endswith("Z")
    assert {k: read[k] for k in ("url", "state", "created_at")} == {
        k: timer[k] for k in ("url", "state", "created_at")
    }


def test_patch_changes_url_payload_and_headers_only(replicas: Replicas) -> None:
    timer = replicas.create("acme", hours=1, payload={"old": True}, headers={"x-old": "1"})
    change = {
        "url": "https://example.org/other?x=1",
        "payload": {"k": [1, 2], "s": "é"},
        "headers": {"X-Token": "abc"},
    }
    response = _patch(replicas, timer["id"], change, replica=1)
    assert response.status_code == 200, response.text
    read = _get(replicas, timer["id"])
    assert read["url"] == "https://example.org/other?x=1"
    assert read["payload"] == {"k": [1, 2], "s": "é"}
    assert read["headers"] == {"x-token": "abc"}
    assert (read["fire_at"], read["state"]) == (timer["fire_at"], "pending")

    only_payload = _patch(replicas, timer["id"], {"payload": None})
    assert only_payload.status_code == 200, only_payload.text
    read = _get(replicas, timer["id"])
    assert (read["url"], read["headers"]) == ("https://example.org/other?x=1", {"x-token": "abc"})


@pytest.mark.parametrize(
    ("change", "code"),
    [
        pytest.param({}, "invalid_body", id="empty"),
        pytest.param({"second": 5}, "unknown_field", id="typo"),
        pytest.param({"seconds": 5, "state": "fired"}, "unknown_field", id="state"),
        pytest.param({"tenant": "globex"}, "unknown_field", id="tenant"),
        pytest.param({"max_attempts": 3}, "unknown_field", id="max_attempts"),
        pytest.param({"id": MISSING_ID}, "unknown_field", id="id"),
        pytest.param({"seconds": 5, "fire_at": "2030-01-01T00:00:00Z"}, "invalid_field", id="both"),
        pytest.param({"seconds": 0}, "invalid_field", id="zero-delay"),
        pytest.param({"hours": 10**6}, "invalid_field", id="past-the-cap"),
        pytest.param({"url": "ftp://example.com/"}, "invalid_field", id="ftp-url"),
        pytest.param({"url": "http://169.254.169.254/latest"}, "invalid_field", id="metadata-url"),
        pytest.param({"url": "http://10.0.0.1/x"}, "invalid_field", id="private-url"),
        pytest.param({"headers": {"Host": "x"}}, "invalid_field", id="host-header"),
        pytest.param({"payload": "x" * 9000}, "invalid_field", id="payload-too-big"),
    ],
)
def test_a_bad_patch_is_422_and_changes_nothing(
    replicas: Replicas, change: dict[str, Any], code: str
) -> None:
    timer = replicas.create("acme", hours=1)
    before = dict(rows(replicas.db, "id = ?", (timer["id"],))[0])
    assert_error(_patch(replicas, timer["id"], change), 422, code)
    assert dict(rows(replicas.db, "id = ?", (timer["id"],))[0]) == before


def test_patch_judges_the_url_by_the_configured_allowed_networks(replicas: Replicas) -> None:
    # The test processes run with TIMERD_ALLOWED_NETWORKS=127.0.0.0/8: a create may point at
    # loopback, and a PATCH must apply the same policy as a create.
    loopback = "http://127.0.0.1:9/hooks"
    assert replicas.create("acme", hours=1, url=loopback)["url"] == loopback
    timer = replicas.create("acme", hours=1)
    response = _patch(replicas, timer["id"], {"url": loopback})
    assert response.status_code == 200, response.text
    assert _get(replicas, timer["id"])["url"] == loopback


@pytest.mark.parametrize("state", ["firing", "fired", "failed", "cancelled"])
def test_patch_of_a_claimed_or_finished_timer_is_409_and_changes_nothing(
    replicas: Replicas, state: str
) -> None:
    if state == "cancelled":
        timer = replicas.create("acme", hours=1)
        assert replicas.client("acme").delete(f"/timers/{timer['id']}").status_code == 200
    else:  # claimed by a daemon (firing), then maybe finished
        timer = replicas.create("acme", fire_at="2001-01-01T00:00:00Z")
        put_in_state(replicas.db, timer["id"], None if state == "firing" else State(state))
    before_row = dict(rows(replicas.db, "id = ?", (timer["id"],))[0])
    before = _get(replicas, timer["id"])
    assert before["state"] == state

    for change in ({"hours": 2}, {"url": "https://example.org/new"}, {"payload": {"x": 1}}):
        error = assert_error(
            _patch(replicas, timer["id"], change, replica=1), 409, "state_conflict"
        )
        assert error["state"] == state

    assert stable(_get(replicas, timer["id"])) == stable(before)
    assert dict(rows(replicas.db, "id = ?", (timer["id"],))[0]) == before_row


# 6. the per-tenant cap


@dataclass
class Server:
    proc: TimerdProcess
    db: Path
    tokens: dict[str, str]

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.proc.base_url, headers=bearer(self.tokens[tenant]), timeout=5.0
        )


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("capped")
    db = path / "timers.db"
    tokens = {tenant: store_key(db, tenant) for tenant in ("acme", "globex", "initech")}
    with TimerdProcesses(path) as procs:
        proc = procs.start("api", sqlite_url(db), env={"TIMERD_MAX_PENDING_PER_TENANT": "3"})
        yield Server(proc, db, tokens)


def pending_of(db: Path, tenant: str) -> int:
    return len(rows(db, "tenant = ? AND state = 'pending'", (tenant,)))


def test_the_per_tenant_cap_answers_429_and_frees_up_after_a_cancel(capped: Server) -> None:
    with capped.client("acme") as acme, capped.client("globex") as globex:
        mine = [created(acme.post("/timers", content=body(hours=1)))["id"] for _ in range(3)]
        refused = acme.post("/timers", content=body(hours=1))
        assert_error(refused, 429, "too_many_pending")
        assert_leaks_nothing(refused)
        assert pending_of(capped.db, "acme") == 3

        created(globex.post("/timers", content=body(hours=1)))  # another tenant is unaffected

        assert acme.delete(f"/timers/{mine[0]}").status_code == 200
        cancelled_at = time.monotonic()

        def try_create() -> httpx.Response | None:
            response = acme.post("/timers", content=body(hours=1))
            assert response.status_code in {201, 429}, response.text
            return response if response.status_code == 201 else None

        wait_until(try_create, 3.0, "room for one more pending timer after a cancel")
        assert time.monotonic() - cancelled_at < 2.0
        assert pending_of(capped.db, "acme") == 3
        assert_error(acme.post("/timers", content=body(hours=1)), 429, "too_many_pending")
        assert pending_of(capped.db, "acme") == 3


def test_concurrent_creates_of_a_tenant_count_its_pending_timers_once(tmp_path: Path) -> None:
    store = open_store(sqlite_url(tmp_path / "timers.db"))
    counted: list[str] = []
    count_pending = store.count_pending

    def counting(tenant: str, limit: int) -> int:
        counted.append(tenant)
        return count_pending(tenant, limit)

    store.count_pending = counting  # type: ignore[method-assign]
    cap = PendingCap(store, 10)

    async def creates_at_once() -> list[int]:
        return list(await asyncio.gather(*(cap.room("acme") for _ in range(20))))

    try:
        assert asyncio.run(creates_at_once()) == [10] * 20
    finally:
        store.close()
    assert counted == ["acme"]  # one counts, the others go by the last count meanwhile


def test_an_idempotent_retry_at_the_cap_returns_the_original_timer(capped: Server) -> None:
    with capped.client("initech") as initech:
        answers = [
            initech.post("/timers", content=body(hours=1), headers={"Idempotency-Key": f"k{i}"})
            for i in range(3)
        ]
        ids = [created(a)["id"] for a in answers]

        retry = initech.post("/timers", content=body(hours=1), headers={"Idempotency-Key": "k2"})
        assert retry.status_code == 201, retry.text
        assert retry.json()["id"] == ids[2]
        assert retry.headers["idempotent-replayed"] == "true"
        assert pending_of(capped.db, "initech") == 3


# 7. the per-key rate limit


def test_the_rate_limit_is_per_key_with_retry_after(procs: TimerdProcesses, tmp_path: Path) -> None:
    db = tmp_path / "timers.db"
    tokens = {tenant: store_key(db, tenant) for tenant in ("acme", "globex")}
    proc = procs.start("api", sqlite_url(db), env={"TIMERD_RATE_LIMIT_PER_S": "2"})
    server = Server(proc, db, tokens)
    with server.client("acme") as acme, server.client("globex") as globex:
        burst = [acme.get("/timers") for _ in range(6)]
        statuses = [r.status_code for r in burst]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[0] == 200
        limited = [r for r in burst if r.status_code == 429]
        assert len(limited) >= 3, statuses
        for response in limited:
            assert_error(response, 429, "rate_limited")
            assert int(response.headers["retry-after"]) >= 1
            assert_leaks_nothing(response)

        other = [globex.get("/timers").status_code for _ in range(2)]
        assert other == [200, 200]

        retry_after = int(limited[-1].headers["retry-after"])
        wait_until(
            lambda: acme.get("/timers").status_code == 200,
            retry_after + 1.0,
            "the limited key to be served again after Retry-After",
        )


# 8. error bodies leak nothing


def test_error_bodies_leak_nothing(replicas: Replicas) -> None:
    acme = replicas.client("acme")
    timer = replicas.create("acme")
    assert acme.delete(f"/timers/{timer['id']}").status_code == 200
    key = f"leak-{uuid.uuid4()}"
    created(acme.post("/timers", content=body(hours=1), headers={"Idempotency-Key": key}))
    samples = {
        401: [
            replicas.client(None).get("/timers"),
            replicas.client(None, 1).post("/timers", content=b"{", headers=bearer("tmr_x")),
        ],
        400: [
            acme.post("/timers", content=b'{"url": '),
            acme.post("/timers", content=b"[1]"),
            acme.post("/timers", content=body(hours=1), headers={"Idempotency-Key": ""}),
        ],
        404: [
            acme.get(f"/timers/{MISSING_ID}"),
            acme.get("/timers/" + "%F0%9F%95%90" * 8),
            acme.get("/nowhere/at/all.py"),
            replicas.client("globex").delete(f"/timers/{timer['id']}"),
        ],
        405: [
            acme.put("/timers"),
            acme.delete("/timers"),
            acme.get(f"/timers/{MISSING_ID}/replay"),
        ],
        409: [
            acme.delete(f"/timers/{timer['id']}"),
            _patch(replicas, timer["id"], {"hours": 1}),
            acme.post(f"/timers/{timer['id']}/replay"),
        ],
        413: [
            acme.post("/timers", content=b" " * 20_000),
            acme.patch(f"/timers/{timer['id']}", content=iter([b" " * 10_000] * 2)),
        ],
        422: [
            acme.post("/timers", content=body(seconds=-1)),
            acme.post("/timers", content=body(hours=1, second=5)),
            acme.post("/timers", content=body(hours=1, url="http://127.0.0.1:99999/")),
            acme.post("/timers", content=body(hours=2), headers={"Idempotency-Key": key}),
            acme.get("/timers?state=nope&cursor=zz"),
        ],
    }
    with closing(sqlite3.connect(replicas.db, isolation_level=None)) as lock:
        lock.execute("BEGIN EXCLUSIVE")  # writers wait out the busy timeout, then answer 503
        try:
            samples[503] = [acme.post("/timers", content=body(hours=1))]
        finally:
            lock.execute("ROLLBACK")
    for status, responses in samples.items():
        for response in responses:
            assert response.status_code == status, (status, response.text)
            assert_leaks_nothing(response)
