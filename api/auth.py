"""Who is calling: API keys (`Authorization: Bearer tmr_…`) and the tenant each belongs to.

Protected mode, as Redis has it: with `TIMERD_AUTH=auto` (the default) the API serves without
keys only while it listens on loopback and no key was ever created; otherwise every request
needs one.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time

from api.errors import ApiError
from timerd import keys
from timerd.errors import ConfigError
from timerd.settings import Settings
from timerd.store import Store

ANONYMOUS = ""  # the tenant of requests served without keys
KEYS_EXIST_CACHE_S = 2.0  # how stale "does any key exist?" may be (keys created meanwhile)


def unauthorized() -> ApiError:
    """The one answer for a missing, malformed, unknown or revoked key."""
    return ApiError(
        401, "unauthorized", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
    )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_protected_mode(settings: Settings, store: Store) -> None:
    """Refuse to serve a non-loopback address without keys, unless told `TIMERD_AUTH=none`."""
    if settings.auth != "auto" or is_loopback(settings.host):
        return
    if not any(k.revoked_at_ms is None for k in store.list_keys()):
        raise ConfigError(
            f"TIMERD_AUTH: refusing to serve {settings.host} without API keys; create one with "
            "`timerd keys create --name NAME`, listen on 127.0.0.1, or set TIMERD_AUTH=none"
        )


class Authenticator:
    """Maps a request's `Authorization` header to a tenant, or raises 401."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._mode = settings.auth
        self._open_network = not is_loopback(settings.host)
        self._keys_seen_at = -math.inf
        self._keys_exist = False
        self._limiter = RateLimiter(settings.rate_limit_per_s)

    def tenant_without_store(self) -> str | None:
        """The anonymous tenant when no key is needed and that is known without asking the
        store (so the caller can stay on the event loop); None otherwise."""
        if self._mode == "none":
            return ANONYMOUS
        fresh = time.monotonic() - self._keys_seen_at <= KEYS_EXIST_CACHE_S
        if self._mode == "auto" and not self._open_network and fresh and not self._keys_exist:
            return ANONYMOUS
        return None

    def tenant(self, authorization: str | None) -> str:
        """The caller's tenant; blocking (it may read the store): call from a worker thread."""
        if not self._required():
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        parts = keys.split_token(token.strip()) if scheme.lower() == "bearer" else None
        if parts is None:
            raise unauthorized()
        key = self._store.get_key(parts[0])
        if key is None or not keys.matches(key, parts[1]):
            raise unauthorized()
        self._limiter.take(key.key_id)
        return key.tenant

    def _required(self) -> bool:
        if self._mode != "auto":
            return self._mode == "keys"
        return self._open_network or self._any_keys()

    def _any_keys(self) -> bool:
        now = time.monotonic()
        if now - self._keys_seen_at > KEYS_EXIST_CACHE_S:
            # Any key ever made, revoked too: revoking the last key must not open the API.
            self._keys_exist = bool(self._store.list_keys())
            self._keys_seen_at = now
        return self._keys_exist


class RateLimiter:
    """A token bucket per key in this process: `rate` requests a second, bursts of `rate`."""

    def __init__(self, rate_per_s: float) -> None:
        self._rate = rate_per_s
        self._buckets: dict[str, tuple[float, float]] = {}  # key id → (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: str) -> None:
        """Spend one token of `key_id`'s bucket, or raise 429 with `Retry-After`."""
        if self._rate <= 0:
            return
        capacity = max(1.0, self._rate)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * self._rate)
            if tokens < 1:
                wait_s = math.ceil((1 - tokens) / self._rate)
                raise ApiError(
                    429,
                    "rate_limited",
                    "too many requests for this API key",
                    headers={"Retry-After": str(wait_s)},
                )
            self._buckets[key_id] = (tokens - 1, now)
