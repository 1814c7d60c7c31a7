"""One frozen settings object, built at the edge from CLI flags and `TIMERD_*` variables.

Every field is both a flag (`--lease-ttl-s`) and a variable (`TIMERD_LEASE_TTL_S`); a flag wins
over the variable, which wins over the default. Nothing here reads the environment at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from timerd.durations import parse_retention_s
from timerd.errors import ConfigError
from timerd.retry import DEFAULT_SCHEDULE, parse_schedule
from timerd.signing import Signer
from timerd.ssrf import parse_allowed_networks

DAY_S = 86_400.0

Auth = Literal["auto", "keys", "none"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything timerd can be told; see the configuration table in the README."""

    store: str = field(
        default="sqlite:///timerd.db", metadata=_help("store URL: sqlite:///… or mongodb://…")
    )
    host: str = field(default="127.0.0.1", metadata=_help("address the API listens on"))
    port: int = field(default=8081, metadata=_help("port the API listens on"))
    workers: int = field(
        default=0,
        metadata=_help("firing processes `timerd daemon` runs; 0: one per core"),
    )
    metrics_port: int = field(
        default=9464,
        metadata=_help("port of `timerd daemon`'s /metrics, /healthz and /readyz; 0: none"),
    )
    auth: Auth = field(
        default="auto",
        metadata=_help("keys, none, or auto: keys once any exist, and always off loopback"),
    )
    max_pending_per_tenant: int = field(
        default=1_000_000, metadata=_help("most pending timers one tenant may have")
    )
    rate_limit_per_s: float = field(
        default=0.0, metadata=_help("requests per second per API key and replica; 0: no limit")
    )
    max_body_bytes: int = field(default=16 * 1024, metadata=_help("largest request body"))
    max_request_head_bytes: int = field(
        default=16 * 1024, metadata=_help("largest request line and headers together")
    )
    max_url_chars: int = field(default=2048, metadata=_help("longest webhook URL"))
    max_payload_bytes: int = field(
        default=8 * 1024, metadata=_help("largest payload of a timer, as compact JSON")
    )
    max_headers_bytes: int = field(
        default=4 * 1024, metadata=_help("most bytes of a timer's extra headers, names and values")
    )
    max_delay_s: float = field(
        default=365 * DAY_S, metadata=_help("longest delay a timer may have")
    )
    log_level: LogLevel = field(default="info", metadata=_help("debug, info, warning or error"))
    log_format: LogFormat = field(
        default="auto", metadata=_help("json, console, or auto (console on a terminal)")
    )
    allowed_networks: str = field(
        default="", metadata=_help("CIDRs webhooks may reach although private or loopback")
    )
    signing_secret: str = field(
        default="", metadata=_help("whsec_… secret(s) that sign webhooks, space-separated")
    )
    lease_ttl_s: float = field(
        default=10.0, metadata=_help("how long a leader's lease lasts without renewal")
    )
    lease_renew_s: float = field(
        default=3.0, metadata=_help("how often the leader renews (and standbys try)")
    )
    poll_interval_s: float = field(
        default=1.0, metadata=_help("longest sleep between due-index polls")
    )
    lookahead_s: float = field(
        default=5.0, metadata=_help("how far ahead the leader reads due timers")
    )
    batch_size: int = field(
        default=1000, metadata=_help("most timers read or claimed in one store call")
    )
    concurrency: int = field(default=256, metadata=_help("most deliveries in flight at once"))
    per_host_concurrency: int = field(
        default=32, metadata=_help("most deliveries in flight to one host at once")
    )
    retry_schedule: str = field(
        default=DEFAULT_SCHEDULE,
        metadata=_help("delays between attempts, e.g. 1s,2s,5s; its length is the retries"),
    )
    connect_timeout_s: float = field(default=5.0, metadata=_help("webhook connect timeout"))
    delivery_timeout_s: float = field(default=15.0, metadata=_help("webhook total timeout"))
    drain_grace_s: float = field(
        default=20.0, metadata=_help("how long a stopping daemon waits for deliveries")
    )
    retention: str = field(
        default="7d",
        metadata=_help("how long finished timers are kept before deletion (e.g. 7d; forever)"),
    )
    max_clock_offset_s: float = field(
        default=60.0,
        metadata=_help("a daemon whose clock is further than this from the store's won't lead"),
    )
    allow_weak_writes: bool = field(
        default=False,
        metadata=_help("accept a MongoDB write concern below w=majority&journal=true"),
    )

    def __post_init__(self) -> None:
        _check_settings(self)

    @property
    def claim_ttl_ms(self) -> int:
        """How long a claim stays valid: longer than any delivery, so only dead owners' expire."""
        return int((self.delivery_timeout_s + self.connect_timeout_s + self.lease_ttl_s) * 1000)

    def covers_delivery(self, claimed_until_ms: int, now_ms: int) -> bool:
        """Whether a claim valid until `claimed_until_ms` still covers a whole delivery started
        at `now_ms`; one that does not is handed back, never fired."""
        return (
            claimed_until_ms - now_ms >= (self.delivery_timeout_s + self.connect_timeout_s) * 1000
        )


def _check_settings(s: Settings) -> None:
    positive = (
        "max_delay_s",
        "lease_ttl_s",
        "lease_renew_s",
        "poll_interval_s",
        "lookahead_s",
        "batch_size",
        "concurrency",
        "per_host_concurrency",
        "max_pending_per_tenant",
        "max_body_bytes",
        "max_request_head_bytes",
        "max_url_chars",
        "max_payload_bytes",
        "max_headers_bytes",
        "connect_timeout_s",
        "delivery_timeout_s",
        "max_clock_offset_s",
    )
    for name in positive:
        if not getattr(s, name) > 0:
            raise ConfigError(f"{env_name(name)} must be positive")
    if not 0 < s.port < 65536:
        raise ConfigError("TIMERD_PORT must be between 1 and 65535")
    if s.workers < 0:
        raise ConfigError("TIMERD_WORKERS must not be negative")
    if not 0 <= s.metrics_port < 65536:
        raise ConfigError("TIMERD_METRICS_PORT must be between 0 and 65535")
    if s.lease_renew_s > s.lease_ttl_s / 2:
        raise ConfigError("TIMERD_LEASE_RENEW_S must be at most half of TIMERD_LEASE_TTL_S")
    if s.log_level not in get_args(LogLevel):
        raise ConfigError("TIMERD_LOG_LEVEL must be debug, info, warning or error")
    if s.auth not in get_args(Auth):
        raise ConfigError("TIMERD_AUTH must be auto, keys or none")
    if s.rate_limit_per_s < 0:
        raise ConfigError("TIMERD_RATE_LIMIT_PER_S must not be negative")
    if s.log_format not in get_args(LogFormat):
        raise ConfigError("TIMERD_LOG_FORMAT must be auto, json or console")
    parse_schedule(s.retry_schedule)
    parse_retention_s(s.retention)
    Signer.from_setting(s.signing_secret)
    parse_allowed_networks(s.allowed_networks)
    if s.drain_grace_s < 0:
        raise ConfigError("TIMERD_DRAIN_GRACE_S must not be negative")


def default(field_name: str) -> Any:
    """The default of a settings field, for modules that state the same limit."""
    return next(f.default for f in dataclasses.fields(Settings) if f.name == field_name)


def env_name(field_name: str) -> str:
    """The environment variable of a settings field: `lease_ttl_s` → `TIMERD_LEASE_TTL_S`."""
    return "TIMERD_" + field_name.upper()


def flag_name(field_name: str) -> str:
    """The CLI flag of a settings field: `lease_ttl_s` → `--lease-ttl-s`."""
    return "--" + field_name.replace("_", "-")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError("not a boolean") from None


# By each field's type. A choice is read as it is written (any case, for the log level) and
# checked with the other settings, so its error lists the choices.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: _parse_float,
    bool: _parse_bool,
    Auth: str,
    LogFormat: str,
    LogLevel: str.lower,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per settings field; unset flags stay None so the environment can fill in."""
    for f in dataclasses.fields(Settings):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar=env_name(f.name),
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def build_settings(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Settings from parsed flags, then `environ`, then defaults. Raises `ConfigError` naming
    the variable whose value cannot be used."""
    values: dict[str, Any] = {}
    types = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        kind = types[f.name]
        try:
            values[f.name] = _PARSERS[kind](raw)
        except ValueError as exc:
            raise ConfigError(
                f"{env_name(f.name)}: cannot read {raw!r} as {kind.__name__}"
            ) from exc
    return Settings(**values)
