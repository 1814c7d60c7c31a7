"""One webhook delivery against real loopback receivers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Iterator

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from structlog.testing import capture_logs

from tests.support.receiver import Answer, Arrival, Receiver
from tests.support.timers import timer_for
from timerd import __version__
from timerd.delivery import Attempt, Deliverer, webhook_url
from timerd.models import Timer
from timerd.settings import Settings
from timerd.targets import INVALID_URL


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


def deliver(timer: Timer, resolver: AbstractResolver | None = None, **overrides: float) -> Attempt:
    async def once() -> Attempt:
        settings = Settings(allowed_networks="127.0.0.0/8", **overrides)  # type: ignore[arg-type]
        async with Deliverer(settings, resolver) as deliverer:
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


# whatever goes wrong inside an attempt is a value, never an exception


class Unforeseen(Exception):
    """An exception class no code in timerd knows of."""


class RaisingResolver(AbstractResolver):
    """A resolver that raises `exc` for every name: the attempt's first step fails."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise self.exc

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeError("label too long"),  # what the resolver raised for an un-encodable host
        UnicodeEncodeError("idna", "x", 0, 1, "label empty or too long"),
        ValueError("bad"),
        RuntimeError("unexpected"),
        KeyError("family"),
        TypeError("None"),
        AttributeError("missing"),
        ZeroDivisionError(),
        RecursionError(),
        MemoryError(),
        Unforeseen("from a library timerd does not know"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_any_exception_of_an_attempt_is_an_error_value_logged_with_its_traceback(
    exc: Exception,
) -> None:
    with capture_logs() as logs:
        attempt = deliver(timer_for("http://receiver.test/h"), RaisingResolver(exc))

    assert (attempt.delivered, attempt.status, attempt.permanent) == (False, None, False)
    assert attempt.error == type(exc).__name__
    [entry] = [e for e in logs if e["event"] == "delivery_error"]
    assert entry["log_level"] == "warning"
    assert entry["error"] == type(exc).__name__
    assert isinstance(entry["exc_info"], type(exc))  # structlog renders its traceback


def test_cancelling_an_attempt_still_cancels_it() -> None:
    with pytest.raises(asyncio.CancelledError):
        deliver(timer_for("http://receiver.test/h"), RaisingResolver(asyncio.CancelledError()))


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 64 + ".example.com/h",  # the resolver's idna codec raised UnicodeError
        "http://a..b.example.com/h",
        "http://xn--zz.example.com/h",
        "http://[v1.x]/h",
        "http://a%2eb.example.com/h",
    ],
)
def test_a_stored_url_no_attempt_can_reach_fails_at_once_and_sends_nothing(url: str) -> None:
    attempt = deliver(timer_for(url), RaisingResolver(AssertionError("must not resolve")))
    assert (attempt.error, attempt.permanent, attempt.status) == (INVALID_URL, True, None)


# webhooks are stateless: no cookie jar

SET_COOKIES = (
    ("set-cookie", "session=from-receiver; Path=/"),
    ("set-cookie", "wide=1; Domain=localhost; Path=/; Max-Age=3600"),
    ("set-cookie", "secure=1; Path=/; Secure; HttpOnly; SameSite=None"),
    ("set-cookie2", 'legacy="1"; Version="1"; Path="/"'),
)


def test_a_cookie_a_receiver_sets_never_rides_along_on_a_later_webhook() -> None:
    own = (("cookie", "mine=1"),)
    timers = [timer_for(""), timer_for(""), timer_for("", headers=own)]

    async def three(receiver: Receiver) -> list[Attempt]:
        # localhost: a cookie jar ignores cookies from IP addresses, not from host names
        settings = Settings(allowed_networks="127.0.0.0/8,::1/128")
        async with Deliverer(settings) as deliverer:
            return [
                await deliverer.deliver(dataclasses.replace(t, url=receiver.url)) for t in timers
            ]

    with Receiver(lambda _: Answer(200, SET_COOKIES), host="localhost") as receiver:
        attempts = asyncio.run(three(receiver))
        arrivals = receiver.wait_for(3)
    assert all(a.delivered for a in attempts), attempts
    assert [a.headers.get("cookie") for a in arrivals] == [None, None, "mine=1"]
