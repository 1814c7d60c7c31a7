"""Durations as people write them in settings: `500ms`, `5s`, `5m`, `2h`, `7d`."""

from __future__ import annotations

import re

from timerd.errors import ConfigError

UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)


def parse_duration_s(text: str, setting: str) -> float:
    """`"5m"` → 300.0; raises `ConfigError` naming `setting` for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{setting}: {text.strip()!r} is not a duration such as 500ms, 5s, 5m, 2h or 1d"
        )
    return float(match[1]) * UNITS_S[match[2]]


def parse_retention_s(text: str) -> float | None:
    """`TIMERD_RETENTION`: a duration, or `forever` (None: never delete)."""
    if text.strip().lower() == "forever":
        return None
    return parse_duration_s(text, "TIMERD_RETENTION")
