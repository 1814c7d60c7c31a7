"""structlog set-up: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

_ENCODER = msgspec.json.Encoder(enc_hook=repr)  # what JSON has no type for is logged as its repr


def _json_line(event: dict[str, Any], **_: Any) -> bytes:
    """One event as a JSON line: msgspec writes it in a third of `json.dumps`'s time, and the
    daemon logs every delivery."""
    return _ENCODER.encode(event)


class _UtcStamper:
    """structlog's `TimeStamper(fmt="iso", utc=True)` (always with microseconds), formatting
    each second's date and time once instead of at every line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and stdlib logging, which uvicorn uses) once, from the CLI."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if json_output
        else structlog.dev.ConsoleRenderer()
    )
    factory: structlog.typing.WrappedLogger = (
        structlog.BytesLoggerFactory(sys.stderr.buffer)
        if json_output
        else structlog.PrintLoggerFactory(sys.stderr)
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _UtcStamper(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=numeric_level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
