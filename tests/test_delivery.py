"""One webhook delivery against real loopback receivers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.receiver import Arrival, Receiver
from tests.support.timers import timer_for
from timerd import __version__
from timerd.delivery import Attempt, Deliverer, webhook_url
from timerd.models import Timer
from timerd.settings import Settings


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://x.test/h?k=1", "https://x.test/h/ID?k=1"),
        ("https://x.test/h/", "https://x.test/h/ID"),
        ("https://x.test", "https://x.test/ID"),
        ("https://x.test/", "https://x.test/ID"),
        ("http://x.test:8080/a/b//?k=1&j=2", "http://x.test:8080/a/b/ID?k=1&j=2"),
    ],
)
def test_the_id_is_appended_to_the_path_with_one_slash(base: str, expected: str) -> None:
    assert webhook_url(base, "ID") == expected


def deliver(timer: Timer, **overrides: float) -> Attempt:
    async def once() -> Attempt:
        settings = Settings(allowed_networks="127.0.0.0/8", **overrides)  # type: ignore[arg-type]
        async with Deliverer(settings) as deliverer:
            return await deliverer.deliver(timer)

    return asyncio.run(once())


def test_a_webhook_carries_the_contract_headers_and_body() -> None:
    with Receiver() as receiver:
        timer = timer_for(receiver.url + "?k=1")
        before_s = int(time.time())
        attempt = deliver(timer)
        [arrival] = receiver.wait_for(1)
    assert attempt.delivered and attempt.status == 200 and attempt.error is None
    assert (arrival.path, arrival.query) == (f"/hooks/{timer.id}", "k=1")
    assert arrival.headers["content-type"] == "application/json"
    assert arrival.headers["user-agent"] == f"timerd/{__version__}"
    assert arrival.headers["webhook-id"] == timer.id
    assert before_s <= int(arrival.headers["webhook-timestamp"]) <= int(time.time())
    assert json.loads(arrival.body) == {
        "id": timer.id,
        "type": "timer.fired",
        "due_at_ms": timer.due_at_ms,
        "created_at_ms": timer.created_at_ms,
        "attempt": 1,
    }


@pytest.mark.parametrize(
    ("status", "delivered"),
    [
        (200, True),
        (204, True),
        (299, True),
        (302, False),
        (400, False),
        (410, False),
        (500, False),
        (503, False),
    ],
)
def test_only_2xx_counts_and_redirects_are_not_followed(status: int, delivered: bool) -> None:
    def answer(arrival: Arrival) -> int:
        return status if arrival.path.startswith("/hooks") else 200

    with Receiver(answer) as receiver:
        attempt = deliver(timer_for(receiver.url))
        arrivals = receiver.wait_for(1)
    assert (attempt.delivered, attempt.status) == (delivered, status)
    assert len(arrivals) == 1


def test_refused_connection_is_an_error_value() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    attempt = deliver(timer_for(f"http://127.0.0.1:{port}/h"))
    assert (attempt.delivered, attempt.status, attempt.error) == (
        False,
        None,
        "ClientConnectorError",
    )


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/h"


def test_a_receiver_that_never_answers_costs_one_bounded_attempt(silent_server: str) -> None:
    started = time.monotonic()
    attempt = deliver(timer_for(silent_server), delivery_timeout_s=0.5)
    assert (attempt.delivered, attempt.error) == (False, "timeout")
    assert time.monotonic() - started < 5
