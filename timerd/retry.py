"""When to try a failed delivery again, and when to give up.

Retryable: no answer at all (refused, reset, DNS failure, timeout), 408, 425, 429, 5xx, and
1xx/3xx (redirects are not followed). Permanent: every other 4xx, `410 Gone` among them, and an
attempt that says so itself (a target the SSRF guard denies: `address_denied`).
After attempt n the next one waits `schedule[n-1]` (the last entry repeats), spread by ±10 %
jitter, or what the receiver's `Retry-After` asked for, within [1 s, 24 h].
"""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from timerd.durations import parse_duration_s

DEFAULT_SCHEDULE = "5s,5m,30m,2h,5h,10h,10h"
RETRY_AFTER_BOUNDS_S = (1.0, 24 * 3600.0)
JITTER = 0.1
RETRYABLE_4XX = frozenset({408, 425, 429})

# ASCII digits: str.isdigit() also holds for "²" and other scripts' digits, which float() refuses.
_DELAY_SECONDS = re.compile(r"[0-9]+", re.ASCII)


class Verdict(enum.Enum):
    """What an attempt's result means for the timer."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"


def classify(status: int | None, *, permanent: bool = False) -> Verdict:
    """Judge an attempt by its HTTP status; None (no answer at all) is retryable unless the
    attempt is `permanent` (no later attempt can succeed)."""
    if permanent:
        return Verdict.PERMANENT
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return Verdict.PERMANENT
    return Verdict.RETRY


def parse_schedule(text: str) -> tuple[float, ...]:
    """`"1s,500ms,5m"` → seconds per retry; raises `ConfigError` naming TIMERD_RETRY_SCHEDULE."""
    return tuple(parse_duration_s(part, "TIMERD_RETRY_SCHEDULE") for part in text.split(","))


def parse_retry_after(value: str | None, now_ms: int) -> float | None:
    """A `Retry-After` header (delay-seconds or an HTTP date) as finite seconds from now, or
    None when it is neither. A receiver sends what it likes: this never raises, and a delay too
    long to matter is cut to the longest the retry policy would wait anyway."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return min(float(value), RETRY_AFTER_BOUNDS_S[1])
    return _seconds_until_http_date(value, now_ms)


def _seconds_until_http_date(value: str, now_ms: int) -> float | None:
    try:
        moment = parsedate_to_datetime(value)
        if moment.tzinfo is None:
            return None
        return moment.timestamp() - now_ms / 1000
    except (TypeError, ValueError, OverflowError, IndexError):  # not a date, or out of range
        return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The operator's schedule: its length is the number of retries after the first attempt."""

    schedule_s: tuple[float, ...]

    @classmethod
    def from_setting(cls, text: str) -> RetryPolicy:
        """Build from `TIMERD_RETRY_SCHEDULE`."""
        return cls(parse_schedule(text))

    @property
    def max_attempts(self) -> int:
        """Attempts a timer gets unless it sets its own `max_attempts`."""
        return len(self.schedule_s) + 1

    def next_due_ms(
        self,
        attempts_made: int,
        max_attempts: int | None,
        now_ms: int,
        retry_after_s: float | None = None,
    ) -> int | None:
        """When to try again after `attempts_made` attempts, or None when the budget is spent."""
        if attempts_made >= (max_attempts or self.max_attempts):
            return None
        if retry_after_s is not None:
            low, high = RETRY_AFTER_BOUNDS_S
            delay_s = min(max(retry_after_s, low), high)
        else:
            base_s = self.schedule_s[min(attempts_made, len(self.schedule_s)) - 1]
            delay_s = base_s * random.uniform(1 - JITTER, 1 + JITTER)
        return now_ms + round(delay_s * 1000)
