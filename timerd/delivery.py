"""Sending one webhook: `POST <url>/<id>` through one shared aiohttp session.

An attempt's outcome is a value (`Attempt`), never an exception: the daemon records it.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import urllib.parse
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import structlog
import yarl
from aiohttp.abc import AbstractResolver

from timerd import __version__
from timerd.callbacks_body import callback_body, callback_webhook_id
from timerd.clock import Clock, SystemClock
from timerd.models import RESPONSE_PREFIX_CHARS, Timer
from timerd.schedules import missed_by
from timerd.settings import Settings
from timerd.signing import Signer
from timerd.ssrf import ADDRESS_DENIED, AddressDenied, AddressPolicy, Denial, GuardedResolver
from timerd.targets import INVALID_URL, origin_checks, origin_match, origin_of

RESPONSE_PREFIX_BYTES = 1024  # read of an answer at most; the rest is never downloaded

log = structlog.get_logger("timerd.delivery")


@dataclass(slots=True)  # not frozen: one per attempt (see models.AttemptRecord)
class Attempt:
    """What one delivery attempt came to: an HTTP status, or the class of error that stopped it."""

    started_at_ms: int
    latency_ms: float
    status: int | None = None
    error: str | None = None
    retry_after: str | None = None  # the answer's Retry-After header, as sent
    response: str | None = None  # a short prefix of the answer's body
    permanent: bool = False  # no later attempt can succeed (a denied address): do not retry

    @property
    def delivered(self) -> bool:
        """Only a 2xx answer counts as delivered."""
        return self.status is not None and 200 <= self.status < 300


def webhook_url(base_url: str, timer_id: str) -> str:
    """`base_url` with `/<timer_id>` appended to its path (exactly one slash), query kept."""
    usual = _usual_split(base_url, timer_id)
    if usual is not None:
        return "".join(usual)
    parts = urllib.parse.urlsplit(base_url)
    path = parts.path.rstrip("/") + "/" + timer_id
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# A path yarl leaves as it is: unreserved characters only (nothing to percent-encode), and no
# segment starting with a dot (nothing for it to normalise).
_PLAIN_PATH = re.compile(r"(?!.*/\.)[A-Za-z0-9._~/-]*", re.ASCII)


def webhook_target(base_url: str, timer_id: str) -> yarl.URL | str:
    """`webhook_url` as aiohttp is given it. For the usual URL, with a plain path, a `yarl.URL`
    built on its origin's, parsed once for all the timers at that origin: parsing a URL of
    each timer's own was a twentieth of a fire's CPU. Any other URL goes as the string. Only
    for a URL whose origin `url_problem` passed (yarl reads it)."""
    usual = _usual_split(base_url, timer_id)
    if usual is None:
        return webhook_url(base_url, timer_id)
    origin, path = usual
    if _PLAIN_PATH.fullmatch(path) is None:
        return origin + path
    return _origin_url(origin).with_path(path, encoded=True)


def _usual_split(base_url: str, timer_id: str) -> tuple[str, str] | None:
    """The origin and the webhook's path of the usual URL (no query or fragment, an origin
    every parser reads alike), without parsing it; None for any other URL."""
    match = origin_match(base_url)
    if match is None or "?" in base_url or "#" in base_url:
        return None
    return match.group(), f"{base_url[match.end() :].rstrip('/')}/{timer_id}"


@functools.lru_cache(maxsize=4096)
def _origin_url(origin: str) -> yarl.URL:
    return yarl.URL(origin)


def webhook_body(timer: Timer, missed: int = 0) -> bytes:
    """The JSON body: which timer fired, when it was due, which attempt this is, and the
    client's `payload` when it gave one; for a series also which `occurrence` this is, when it
    was scheduled (`scheduled_at_ms`) and how many later occurrences that came due meanwhile it
    stands for (`missed`, see `schedules.missed_by`). Written out directly: every field is a
    number, the hex id, or the payload, which is stored as compact JSON text already."""
    body = (
        f'{{"id":"{timer.id}","type":"timer.fired","due_at_ms":{timer.due_at_ms},'
        f'"created_at_ms":{timer.created_at_ms},"attempt":{timer.attempts}'
    )
    if timer.recurring:
        body += (
            f',"occurrence":{timer.occurrence},"scheduled_at_ms":{timer.occurrence_at_ms},'
            f'"missed":{missed}'
        )
    if timer.payload is not None:
        body += f',"payload":{timer.payload}'
    return (body + "}").encode()


class Deliverer:
    """Delivers webhooks through one `ClientSession`; use as an async context manager.

    Only addresses `TIMERD_ALLOWED_NETWORKS`' policy allows are connected to (`timerd.ssrf`):
    host names through a `GuardedResolver` around `resolver` (aiohttp's `ThreadedResolver`
    unless a test passes a fake), address literals, which aiohttp never resolves, before the
    request."""

    def __init__(
        self,
        settings: Settings,
        resolver: AbstractResolver | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock` stamps each attempt (and its `webhook-timestamp`): the daemon's, which is
        corrected to the store's, so attempt times compare with due times."""
        self._clock = clock or SystemClock()
        self._settings = settings
        self._signer = Signer.from_setting(settings.signing_secret)
        self._policy = AddressPolicy.from_setting(settings.allowed_networks)
        self._inner_resolver = resolver
        self._resolver: GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Deliverer:
        s = self._settings
        inner = self._inner_resolver
        if inner is None:  # created here: it needs the running loop
            inner = aiohttp.ThreadedResolver()
        self._resolver = GuardedResolver(inner, self._policy)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=s.concurrency, ttl_dns_cache=60, resolver=self._resolver
            ),
            timeout=aiohttp.ClientTimeout(total=s.delivery_timeout_s, connect=s.connect_timeout_s),
            headers={"user-agent": f"timerd/{__version__}"},
            auto_decompress=False,
            # Webhooks are stateless: a cookie one receiver sets must never ride along on a
            # later webhook (another timer's, another tenant's).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:  # the connector does not own a resolver it was given
            await self._resolver.close()

    async def deliver(self, timer: Timer) -> Attempt:
        """POST the webhook once; redirects are not followed and at most a short prefix of the
        answer is read. Whatever goes wrong becomes the attempt's `error` (the exception's class
        name), never an exception: a timer must not stay `firing` because of what a receiver,
        a resolver or a URL did. Cancellation still propagates."""
        assert self._session is not None, "use Deliverer as an async context manager"
        started_ms = self._clock.now_ms()
        started = time.perf_counter()
        try:
            body = webhook_body(timer, missed_by(timer, started_ms))
            post = _Post(timer.id, timer.url, timer.webhook_id, body, timer.headers)
            return await self._attempt(self._session, post, started_ms, started)
        except Exception as exc:  # the unforeseen: one failed attempt, logged with its traceback
            error = type(exc).__name__
            log.warning("delivery_error", timer_id=timer.id, error=error, exc_info=exc)
            return Attempt(started_ms, _ms_since(started), error=error)

    async def deliver_callback(self, timer: Timer) -> Attempt:
        """POST the `timer.failed` callback of a claimed callback once, to
        `<on_failure_url>/<id>`, under the same rules as a webhook (SSRF guard, signing, no
        redirects, no exceptions); the client's `headers` are for its webhook only."""
        assert self._session is not None, "use Deliverer as an async context manager"
        assert timer.on_failure_url is not None, "only a timer with on_failure_url"
        started_ms = self._clock.now_ms()
        started = time.perf_counter()
        post = _Post(
            timer.id,
            timer.on_failure_url,
            callback_webhook_id(timer),
            callback_body(timer),
            (),
        )
        try:
            return await self._attempt(self._session, post, started_ms, started)
        except Exception as exc:
            error = type(exc).__name__
            log.warning("callback_error", timer_id=timer.id, error=error, exc_info=exc)
            return Attempt(started_ms, _ms_since(started), error=error)

    async def _attempt(
        self, session: aiohttp.ClientSession, post: _Post, started_ms: int, started: float
    ) -> Attempt:
        denial, problem = origin_checks(origin_of(post.base_url), self._policy)
        if problem is not None:  # stored before the API refused such URLs
            log.warning(INVALID_URL, timer_id=post.timer_id, problem=problem)
            return Attempt(started_ms, _ms_since(started), error=INVALID_URL, permanent=True)
        if denial is not None:  # an address literal: aiohttp connects without resolving it
            return _denied(post.timer_id, denial, started_ms, started)
        try:
            async with session.post(
                webhook_target(post.base_url, post.timer_id),
                data=post.body,
                headers=self._headers(post, started_ms),
                allow_redirects=False,
            ) as response:
                prefix = await response.content.read(RESPONSE_PREFIX_BYTES)
        except AddressDenied as exc:  # raised by the resolver, before any connection
            return _denied(post.timer_id, exc.denial, started_ms, started)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            return Attempt(started_ms, _ms_since(started), error=error)
        return Attempt(
            started_ms,
            _ms_since(started),
            status=response.status,
            retry_after=response.headers.get("retry-after"),
            response=prefix.decode("utf-8", "replace")[:RESPONSE_PREFIX_CHARS] or None,
        )

    def _headers(self, post: _Post, started_ms: int) -> dict[str, str]:
        headers = {
            **dict(post.headers),
            "content-type": "application/json",
            "webhook-id": post.webhook_id,
            "webhook-timestamp": str(started_ms // 1000),
        }
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.signature(
                post.webhook_id, started_ms // 1000, post.body
            )
        return headers


@dataclass(slots=True)  # not frozen: one per attempt (see models.AttemptRecord)
class _Post:
    """One signed POST: a timer's webhook or its failure callback."""

    timer_id: str
    base_url: str  # `/<timer_id>` is appended
    webhook_id: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


def _denied(timer_id: str, denial: Denial, started_ms: int, started: float) -> Attempt:
    """The attempt at a target the policy denies: permanent, nothing sent."""
    log.warning(ADDRESS_DENIED, timer_id=timer_id, host=denial.host, reason=denial.reason)
    return Attempt(started_ms, _ms_since(started), error=ADDRESS_DENIED, permanent=True)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
