"""The OpenAPI document (`GET /openapi.json`): valid, naming exactly the app's routes, and true of
a real `timerd api`, which schemathesis fuzzes with well over 1,000 generated requests.

The fuzzing is bounded and reproducible: a fixed seed, a fixed number of examples per operation
and generation mode, no deadline, no shrinking, no example database, and Hypothesis' storage
directory in `tmp_path` (nothing is written to `.hypothesis/`). Every request goes to a
`timerd api` subprocess on 127.0.0.1 and nothing else runs, so the URLs in generated bodies are
stored but never fetched (the API never fetches them; no daemon runs here). The answers the
fuzzer cannot provoke (401, 413, 429, 503, idempotent replays) are provoked on purpose and
checked against the document with the same checks. Create and change bodies are fuzzed a
second time from a copy of the document that requires `payload` and `headers`, so arbitrary JSON
payloads and header objects are sent, not only the documented examples.
"""

from __future__ import annotations

import copy
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from openapi_spec_validator import validate
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from starlette.routing import Route

from api.app import create_app
from api.openapi import OPENAPI
from tests.support.procs import TimerdProcess, TimerdProcesses
from timerd import keys
from timerd.models import AttemptRecord, Claim, Outcome, State
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.sqlite import SqliteStore

SEED = 20_261_129
EXAMPLES = 90  # per operation and generation mode: 6 operations with inputs x 2 modes x 90
MIN_REQUESTS = 1_000
CHECKS = [  # no 5xx; status code, content type, required headers and body as documented
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
URL = "https://example.com/hooks"
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
BODY_OPERATIONS = [("/timers", "post"), ("/timers/{timer_id}", "patch")]


def with_payload_and_headers(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with `payload` and `headers` required in create and change bodies, so that
    every request generated from it carries both: arbitrary JSON values and header objects,
    not only the documented examples."""
    exercised = copy.deepcopy(document)
    for name in ("CreateTimer", "ChangeTimer"):
        body = exercised["components"]["schemas"][name]
        body["required"] = sorted({*body.get("required", []), "payload", "headers"})
    return exercised


EXERCISED = schemathesis.openapi.from_dict(with_payload_and_headers(OPENAPI))


def conforms(
    response: httpx.Response,
    path: str,
    method: str,
    *,
    checks: list[Any] = CHECKS,
    **path_parameters: str,
) -> None:
    """Fail unless `response` is an answer the document allows for `method path`."""
    case = SCHEMA[path][method].Case(path_parameters=path_parameters or None)
    case.validate_response(response, checks=checks)


# the document itself


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(OPENAPI)
    assert OPENAPI["openapi"].startswith("3.1.")


def test_the_document_names_exactly_the_routes_and_methods_of_the_app(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    with closing(store):
        app = create_app(Settings(), store)
    served: dict[str, set[str]] = {}
    for route in app.routes:
        assert isinstance(route, Route), route
        methods = {method.lower() for method in route.methods or ()}
        if "get" in methods:
            methods.discard("head")  # Starlette answers HEAD wherever it answers GET
        served[route.path] = methods
    documented = {
        path: {name for name in item if name in HTTP_METHODS}
        for path, item in OPENAPI["paths"].items()
    }
    assert documented == served


# a server with keys: what only keys, limits and caps can provoke


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TimerdProcess, list[str]]]:
    """A `timerd api` that requires keys, allows one request per key (in practice) and one
    pending timer per tenant; three keys of one tenant."""
    tmp_path = tmp_path_factory.mktemp("keyed")
    db = tmp_path / "timerd.db"
    store = SqliteStore(str(db))
    tokens = []
    try:
        for name in ("a", "b", "c"):
            token, key = keys.new_key(name, "tenant", time.time_ns() // 1_000_000)
            store.add_key(key)
            tokens.append(token)
    finally:
        store.close()
    env = {
        "TIMERD_AUTH": "keys",
        "TIMERD_RATE_LIMIT_PER_S": "0.001",
        "TIMERD_MAX_PENDING_PER_TENANT": "1",
    }
    with TimerdProcesses(tmp_path) as procs:
        yield procs.start("api", f"sqlite:///{db}", env=env), tokens


def test_openapi_json_is_served_without_a_key(keyed: tuple[TimerdProcess, list[str]]) -> None:
    server, _ = keyed
    response = httpx.get(f"{server.base_url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == OPENAPI
    conforms(response, "/openapi.json", "GET")


def test_401_and_both_429s_are_as_documented(keyed: tuple[TimerdProcess, list[str]]) -> None:
    server, (first, second, third) = keyed
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:

        def create(token: str) -> httpx.Response:
            auth = {"authorization": f"Bearer {token}"}
            return client.post("/timers", json={"hours": 1, "url": URL}, headers=auth)

        answers = {
            "no key": (client.get("/timers"), 401, "unauthorized"),
            "a wrong key": (create(first + "x"), 401, "unauthorized"),
            "a key": (create(first), 201, None),
            "the key again": (create(first), 429, "rate_limited"),
            "another key of the tenant": (create(second), 429, "too_many_pending"),
        }
        listed = client.get("/timers", headers={"authorization": f"Bearer {third}"})
    for what, (response, status, code) in answers.items():
        assert response.status_code == status, (what, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code, what
        conforms(response, "/timers", response.request.method)
    assert listed.status_code == 200
    conforms(listed, "/timers", "GET")


# fuzzing


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TimerdProcess, Path, list[str]]]:
    """A `timerd api` on a fresh SQLite file with the default SSRF policy (no loopback
    allowance), its database, and the ids of timers seeded in every state."""
    tmp_path = tmp_path_factory.mktemp("openapi")
    db = tmp_path / "timerd.db"
    store_url = f"sqlite:///{db}?busy_timeout_ms=300"  # a locked store answers 503 soon
    with TimerdProcesses(tmp_path) as procs:
        server = procs.start("api", store_url, env={"TIMERD_ALLOWED_NETWORKS": ""})
        yield server, db, seed_timers(server, db)


def seed_timers(server: TimerdProcess, db: Path) -> list[str]:
    """Timers in each state: pending (two, one waiting for a retry after a failed attempt),
    firing, fired, failed and cancelled; the daemon's part is played through the store."""
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:

        def create(**fields: Any) -> str:
            body = {"url": URL, "payload": {"n": [1, None]}, "headers": {"x-a": "1"}, **fields}
            answer = client.post("/timers", json=body)
            assert answer.status_code == 201, answer.text
            timer_id: str = answer.json()["id"]
            return timer_id

        pending = create(hours=1, max_attempts=3)
        due = [create(fire_at="2001-01-01T00:00:00Z") for _ in range(4)]
        cancelled = create(minutes=5)
        assert client.delete(f"/timers/{cancelled}").status_code == 200
    now_ms = time.time_ns() // 1_000_000
    store = SqliteStore(str(db))
    try:
        claim = Claim("test", now_ms=now_ms, until_ms=now_ms + 10**9, token="test")
        assert len(store.claim_due(due, claim)) == 4
        record = AttemptRecord(attempt=1, at_ms=now_ms, latency_ms=12.5, status=500, response="x")
        outcomes = [
            Outcome(due[0], "test", State.FIRED, now_ms, status=200, record=record),
            Outcome(due[1], "test", State.FAILED, now_ms, error="refused", record=record),
            Outcome(due[2], "test", State.PENDING, now_ms, 500, None, now_ms + 10**8, record),
        ]  # due[3] stays firing
        assert store.complete(outcomes) == 3
    finally:
        store.close()
    return [pending, *due, cancelled]


@dataclass
class Tally:
    """Requests sent per operation and mode, statuses seen, timers created, failures found."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    created: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def fuzz(operation: Any, mode: GenerationMode, base_url: str, ids: list[str], tally: Tally) -> None:
    """Send EXAMPLES generated requests for one operation; record what fails. A `timer_id` is
    often replaced by the id of an existing timer, so that more than 404s come back."""
    label = f"{operation.label} ({mode.value})"
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: straight to 127.0.0.1
    aimed = any(parameter.name == "timer_id" for parameter in operation.path_parameters)
    targets = st.sampled_from([None, *ids, *tally.created[-10:]]) if aimed else st.none()

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the request as sent
        suppress_health_check=list(HealthCheck),  # a bounded run, not a judgement of strategies
        print_blob=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode), timer_id=targets)
    def run(case: Case[Any], timer_id: str | None) -> None:
        if timer_id is not None:
            case.path_parameters = {**(case.path_parameters or {}), "timer_id": timer_id}
        tally.requests[label] += 1
        response = case.call(base_url=base_url, session=session, timeout=10, allow_redirects=False)
        tally.statuses[response.status_code] += 1
        if response.status_code == 201:
            tally.created.append(response.json()["id"])
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    except (FailureGroup, AssertionError, requests.RequestException) as exc:
        tally.failures.append(f"{label}: {exc}")
    finally:
        session.close()


def test_fuzzing_finds_no_5xx_and_no_answer_outside_the_document(
    api: tuple[TimerdProcess, Path, list[str]], tmp_path: Path
) -> None:
    server, _, ids = api
    tally = Tally()
    set_hypothesis_home_dir(tmp_path / "hypothesis")  # not ./.hypothesis
    try:
        for path, item in OPENAPI["paths"].items():
            for method in [name for name in item if name in HTTP_METHODS]:
                operation = SCHEMA[path][method]
                has_inputs = any(
                    [operation.path_parameters, operation.query, operation.headers, operation.body]
                )
                negative = [GenerationMode.NEGATIVE] if has_inputs else []
                for mode in [GenerationMode.POSITIVE, *negative]:
                    fuzz(operation, mode, server.base_url, ids, tally)
        for path, method in BODY_OPERATIONS:  # every body with a payload and headers
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(EXERCISED[path][method], mode, server.base_url, ids, tally)
    finally:
        set_hypothesis_home_dir(None)
    assert server.running(), server.describe("died while fuzzed")
    assert not tally.failures, "\n\n".join(tally.failures)
    assert sum(tally.requests.values()) >= MIN_REQUESTS, tally.requests
    assert {200, 201, 400, 404, 409, 422} <= set(tally.statuses), tally.statuses


def test_answers_the_fuzzer_does_not_reach_are_as_documented(
    api: tuple[TimerdProcess, Path, list[str]],
) -> None:
    server, db, ids = api
    key = {"idempotency-key": uuid.uuid4().hex}
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:

        def post(status: int, code: str | None, body: Any, headers: Any = None) -> None:
            content = body if isinstance(body, bytes) else None
            response = client.post(
                "/timers", content=content, json=None if content else body, headers=headers
            )
            assert response.status_code == status, response.text
            if code is not None:
                assert response.json()["error"]["code"] == code
            conforms(response, "/timers", "POST")

        def nested(depth: int) -> bytes:
            payload = "[" * depth + "]" * depth
            return f'{{"url": "{URL}", "seconds": 5, "payload": {payload}}}'.encode()

        post(413, "body_too_large", {"url": URL, "seconds": 5, "payload": "x" * 20_000})
        post(201, None, {"url": URL, "seconds": 5}, key)
        post(201, None, {"url": URL, "seconds": 5}, key)  # the original timer, replayed
        post(422, "idempotency_conflict", {"url": URL, "seconds": 6}, key)
        post(400, "invalid_idempotency_key", {"url": URL, "seconds": 5}, {"idempotency-key": ""})
        post(201, None, nested(100))
        post(422, "invalid_field", nested(101))
        # Near the depth where the server's json.loads gives up (400), json.dumps of the answer
        # gave up first: a stored timer answered 500 (RecursionError).
        for depth in range(900, 1001):
            response = client.post("/timers", content=nested(depth))
            assert response.status_code in {400, 422}, (depth, response.text)
            conforms(response, "/timers", "POST")
        for limit in ["²", "\u0661", "1" * 4400]:  # "²".isdigit(); int() refuses 4,300+ digits
            response = client.get("/timers", params={"limit": limit})
            assert response.status_code == 422, (limit, response.text)
            conforms(response, "/timers", "GET")

        with closing(sqlite3.connect(db, isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")
            try:
                unavailable = [
                    (client.post("/timers", json={"url": URL, "seconds": 5}), "/timers", "POST"),
                    (client.delete(f"/timers/{ids[0]}"), "/timers/{timer_id}", "DELETE"),
                ]
            finally:
                lock.execute("ROLLBACK")
    for response, path, method in unavailable:
        assert response.status_code == 503, response.text
        parameters = {"timer_id": ids[0]} if "{" in path else {}
        conforms(response, path, method, checks=CHECKS[1:], **parameters)  # a documented 5xx
