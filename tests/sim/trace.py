"""The trace of one run: the simulator's own events (digested, to prove a replay is exact) and,
when verbose, every log event of the daemons, each stamped with virtual time and actor."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

from tests.sim.loop import ACTOR, VirtualLoop

TAIL_LINES = 200  # kept when not verbose, printed with a failure


class Trace:
    """Lines of `<virtual s> <actor> <event>`."""

    def __init__(self, loop: VirtualLoop, *, verbose: bool) -> None:
        self._loop = loop
        self.verbose = verbose
        self.lines: collections.deque[str] = collections.deque(
            maxlen=None if verbose else TAIL_LINES
        )
        self._digest = hashlib.blake2b(digest_size=8)

    def _line(self, text: str) -> str:
        return f"{self._loop.time():9.3f} {ACTOR.get():>4} {text}"

    def __call__(self, text: str) -> None:
        """A simulator event: part of the digest."""
        line = self._line(text)
        self._digest.update(line.encode())
        self.lines.append(line)

    def log(self, event: MutableMapping[str, Any]) -> None:
        """A daemon's log event: kept for reading, not digested (it names random tokens)."""
        name = event.pop("event", "?")
        level = event.pop("level", "")
        exc_info = event.pop("exc_info", None)
        fields = " ".join(f"{k}={v}" for k, v in event.items())
        if exc_info:
            fields += f" exc={exc_info!r}"
        self.lines.append(self._line(f"  log {level} {name} {fields}"))

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()


@contextmanager
def capture_logs(trace: Trace) -> Iterator[None]:
    """Send structlog's events to `trace` (every level when verbose, else errors only)."""

    def to_trace(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        event["level"] = method
        trace.log(event)
        raise structlog.DropEvent

    old = structlog.get_config()
    level = 10 if trace.verbose else 40
    structlog.configure(
        processors=[to_trace],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**old)
