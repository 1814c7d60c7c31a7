"""Stores: the contract in `base`, the rules every backend shares in `rules`, one module per
backend, and `open_store` to pick one by URL."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import pymongo
import pymongo.errors
from pymongo.uri_parser import parse_uri

from timerd.errors import ConfigError
from timerd.store.base import Store
from timerd.store.mongo import MongoStore
from timerd.store.sqlite import SqliteStore

__all__ = ["Store", "open_store"]

_SYNCHRONOUS = {"FULL", "NORMAL", "EXTRA"}


def open_store(url: str, *, for_daemon: bool = False, allow_weak_writes: bool = False) -> Store:
    """Open the store a `TIMERD_STORE` URL names, creating files, tables and indexes as needed.

    `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`, with optional query
    parameters `synchronous` (FULL by default; the daemon's own writes use NORMAL unless one is
    given) and `busy_timeout_ms` (1000). `mongodb://` and `mongodb+srv://` URLs name the database
    in their path (default `timerd`) and accept every pymongo URI option; a write concern weaker
    than majority and journaled is refused unless `allow_weak_writes`.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return _open_sqlite(url, for_daemon)
    if scheme in {"mongodb", "mongodb+srv"}:
        return _open_mongo(url, for_daemon, allow_weak_writes)
    raise ConfigError(f"TIMERD_STORE: unsupported store URL scheme {scheme!r}")


def _open_sqlite(url: str, for_daemon: bool) -> Store:
    parts = urllib.parse.urlsplit(url)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc or not path:
        raise ConfigError("TIMERD_STORE: write sqlite:///relative.db or sqlite:////absolute.db")
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    synchronous = query.pop("synchronous", "NORMAL" if for_daemon else "FULL").upper()
    if synchronous not in _SYNCHRONOUS:
        raise ConfigError(f"TIMERD_STORE: synchronous must be one of {sorted(_SYNCHRONOUS)}")
    try:
        busy_timeout_ms = int(query.pop("busy_timeout_ms", "1000"))
    except ValueError as exc:
        raise ConfigError("TIMERD_STORE: busy_timeout_ms must be an integer") from exc
    if query:
        raise ConfigError(f"TIMERD_STORE: unknown sqlite options {sorted(query)}")
    return SqliteStore(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)


# Every operation has a deadline (timeoutMS also bounds a majority write's wait). The daemon's
# outlasts a primary election, so a failover is a pause; the API's is shorter, so clients get a
# 503 they can retry instead of a hung request.
MONGO_TIMEOUTS_MS = {"daemon": 30_000, "api": 5_000}


def _open_mongo(url: str, for_daemon: bool, allow_weak_writes: bool) -> Store:
    try:
        parsed = parse_uri(url)
    except (pymongo.errors.InvalidURI, pymongo.errors.ConfigurationError, ValueError) as exc:
        raise ConfigError(f"TIMERD_STORE: invalid MongoDB URL ({exc})") from exc
    options = {name.lower(): value for name, value in parsed["options"].items()}
    if not allow_weak_writes:
        _refuse_weak_writes(options)
    timeout_ms = MONGO_TIMEOUTS_MS["daemon" if for_daemon else "api"]
    defaults: dict[str, Any] = {
        "w": "majority",
        "journal": True,
        "serverSelectionTimeoutMS": timeout_ms,
        "timeoutMS": timeout_ms,
    }
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        url, **{k: v for k, v in defaults.items() if k.lower() not in options}
    )
    return MongoStore(client, parsed.get("database") or "timerd")


def _refuse_weak_writes(options: Mapping[str, Any]) -> None:
    """A write acknowledged by fewer than a majority, or not journaled, can be rolled back by a
    failover: claims (double deliveries) or acknowledged creates (lost timers)."""
    w = options.get("w", "majority")
    if w != "majority" or options.get("journal") is False:
        raise ConfigError(
            f"TIMERD_STORE: write concern w={w} journal={options.get('journal', True)} is weaker"
            " than w=majority&journal=true, which a failover can roll back; set"
            " TIMERD_ALLOW_WEAK_WRITES=true to accept that"
        )
