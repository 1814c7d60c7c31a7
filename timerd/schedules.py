"""The schedule of a recurring timer and the glue to APScheduler 3's triggers.

A series is one timer whose `schedule` (JSON text of a `Schedule`) gives its occurrences:
`CronTrigger.from_crontab(expr, timezone)` for `cron`, `IntervalTrigger` for `every`. Every
occurrence is computed from the one before it (`following`), never from when that one happened to
fire, so a series does not drift. Times are UTC epoch milliseconds throughout; APScheduler sees
aware datetimes only here.

Occurrences are numbered from 1. `until_ms` and `max_occurrences` end a series: an occurrence
after `until_ms`, or numbered above `max_occurrences`, does not happen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from timerd.models import Timer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_EVERY_MS = 1000
CATCH_UP_COUNT_MAX = 10_000  # missed occurrences counted one by one at most (cron); see `missed`
CatchUp = Literal["once", "all"]
CATCH_UPS: tuple[CatchUp, ...] = ("once", "all")


class ScheduleError(ValueError):
    """A schedule that cannot be used; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def to_datetime(ms: int) -> datetime:
    """UTC epoch milliseconds as an aware UTC datetime (exact, no float)."""
    return EPOCH + timedelta(milliseconds=ms)


def to_ms(moment: datetime) -> int:
    """An aware datetime as UTC epoch milliseconds, rounded to the nearest millisecond."""
    return round((moment - EPOCH) / timedelta(milliseconds=1))


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; `ScheduleError` on `timezone` for an unknown or malformed one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # "../x", "", a directory
        raise ScheduleError("timezone", f"{name!r} is not a known IANA time zone") from exc


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a series' occurrences are: exactly one of `every_ms` (from `start_at_ms`, the first
    occurrence) and `cron` (five crontab fields in `timezone`)."""

    every_ms: int | None = None
    start_at_ms: int | None = None
    cron: str | None = None
    timezone: str = "UTC"
    until_ms: int | None = None
    max_occurrences: int | None = None
    catch_up: CatchUp = "once"

    def to_json(self) -> str:
        """The schedule as compact JSON text, as the stores keep it."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """The schedule back from `to_json`'s text."""
        values: dict[str, Any] = json.loads(text)
        return cls(**values)

    def first_from(self, now_ms: int) -> int | None:
        """The first occurrence time at or after `now_ms` (for an interval, never before its
        `start_at_ms`), or None when there is none."""
        trigger = _trigger(self)
        moment = trigger.get_next_fire_time(None, to_datetime(now_ms))
        return None if moment is None else to_ms(moment)

    def following(self, at_ms: int) -> int | None:
        """The occurrence time right after the one at `at_ms`, or None when there is none."""
        if self.every_ms is not None:
            return at_ms + self.every_ms
        previous = to_datetime(at_ms)
        moment = _trigger(self).get_next_fire_time(previous, previous + timedelta(microseconds=1))
        return None if moment is None else to_ms(moment)

    def allows(self, number: int, at_ms: int) -> bool:
        """Whether occurrence `number` at `at_ms` happens (within `until` and the maximum)."""
        if self.until_ms is not None and at_ms > self.until_ms:
            return False
        return self.max_occurrences is None or number <= self.max_occurrences

    def upcoming(self, number: int, at_ms: int, count: int) -> list[int]:
        """Up to `count` occurrence times starting with occurrence `number` at `at_ms`."""
        times: list[int] = []
        moment: int | None = at_ms
        while moment is not None and len(times) < count and self.allows(number, moment):
            times.append(moment)
            number += 1
            moment = self.following(moment)
        return times

    def missed(self, number: int, at_ms: int, now_ms: int) -> int:
        """With `catch_up` "once": how many occurrences after occurrence `number` (at `at_ms`)
        are due by `now_ms` and so are covered by its delivery; always 0 with "all". A cron count
        stops at CATCH_UP_COUNT_MAX (an interval's is exact)."""
        if self.catch_up == "all":
            return 0
        if self.every_ms is not None:
            count = max(0, (now_ms - at_ms) // self.every_ms)
            return self._within_end(number, at_ms, count)
        count = 0
        moment = self.following(at_ms)
        while (
            moment is not None
            and moment <= now_ms
            and count < CATCH_UP_COUNT_MAX
            and self.allows(number + count + 1, moment)
        ):
            count += 1
            moment = self.following(moment)
        return count

    def _within_end(self, number: int, at_ms: int, count: int) -> int:
        """`count` cut to the interval occurrences after `number` that `until` and the maximum
        allow."""
        assert self.every_ms is not None
        if self.max_occurrences is not None:
            count = min(count, max(0, self.max_occurrences - number))
        if self.until_ms is not None:
            count = min(count, max(0, (self.until_ms - at_ms) // self.every_ms))
        return count

    def next_after(self, number: int, at_ms: int, missed: int) -> tuple[int, int] | None:
        """The occurrence (number, time) after occurrence `number` at `at_ms` whose delivery also
        covered `missed` later ones; None when the series is over."""
        moment: int | None = at_ms
        if self.every_ms is not None:
            moment = at_ms + missed * self.every_ms
        else:
            for _ in range(missed):
                moment = None if moment is None else self.following(moment)
        moment = None if moment is None else self.following(moment)
        following = number + missed + 1
        if moment is None or not self.allows(following, moment):
            return None
        return following, moment


@lru_cache(maxsize=1024)
def _trigger(schedule: Schedule) -> CronTrigger | IntervalTrigger:
    """APScheduler's trigger for `schedule` (triggers are immutable once built: cached)."""
    if schedule.cron is not None:
        return cron_trigger(schedule.cron, schedule.timezone)
    assert schedule.every_ms is not None and schedule.start_at_ms is not None
    return IntervalTrigger(
        seconds=schedule.every_ms / 1000, start_date=to_datetime(schedule.start_at_ms), timezone=UTC
    )


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """`CronTrigger.from_crontab` for five fields; `ScheduleError` naming `cron` (or
    `timezone`) for anything it refuses. A numeric day of week means what crontab means by it
    (0 and 7 Sunday), where APScheduler 3 counts from Monday: such a field is handed over as
    day names (`weekday_names`)."""
    tz = zone(timezone)
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError("cron", "cron must have five fields: minute hour day month weekday")
    try:
        fields[4] = weekday_names(fields[4])
        return CronTrigger.from_crontab(" ".join(fields), timezone=tz)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ScheduleError("cron", f"cron {expr!r} is not valid: {exc}") from exc


CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")  # crontab's 0 to 7


def weekday_names(field: str) -> str:
    """A crontab day-of-week field with numbers (`1-5`, `0,6`, `*/2`) as the day names it means
    (`mon,tue,wed,thu,fri`); a field without digits is APScheduler's to read as it is."""
    if not any(c.isdigit() for c in field):
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            low, high = 0, 6
        else:
            low_text, _, high_text = span.partition("-")
            low, high = _day(low_text), _day(high_text or low_text)
            if step_text and not high_text:
                high = 6
        if step < 1 or low > high:
            raise ValueError(f"{part!r} is not a day-of-week range")
        days.update(range(low, high + 1, step))
    return ",".join(CRONTAB_DAYS[d] for d in sorted({d % 7 for d in days}))


def _day(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text.lower()[:3] in CRONTAB_DAYS and len(text) == 3:
        return CRONTAB_DAYS.index(text.lower())
    raise ValueError(f"{text!r} is not a day of the week")


@lru_cache(maxsize=4096)
def parse_stored(text: str) -> Schedule:
    """A stored schedule (JSON text), parsed once per distinct text."""
    return Schedule.from_json(text)


def missed_by(timer: Timer, at_ms: int) -> int:
    """How many later occurrences a delivery of a series' current occurrence that starts at
    `at_ms` covers (see `Schedule.missed`); 0 for a one-off timer."""
    if timer.schedule is None or timer.occurrence_at_ms is None:
        return 0
    return parse_stored(timer.schedule).missed(timer.occurrence, timer.occurrence_at_ms, at_ms)


def next_occurrence(timer: Timer, at_ms: int) -> tuple[int, int] | None:
    """The occurrence (number, time) a series goes on with once its current occurrence, whose
    last attempt started at `at_ms`, has ended; None when the series is over (or not one)."""
    if timer.schedule is None or timer.occurrence_at_ms is None:
        return None
    schedule = parse_stored(timer.schedule)
    missed = missed_by(timer, at_ms)
    return schedule.next_after(timer.occurrence, timer.occurrence_at_ms, missed)


def local_to_ms(local: datetime, timezone: str) -> int:
    """A wall-clock time (naive `local`) in `timezone` as UTC epoch milliseconds.

    A time that does not exist there (skipped when clocks spring forward) moves forward to the
    first valid instant, the moment of the jump (02:30 on a night that jumps from 02:00 to 03:00
    is 03:00). A time that happens twice (when clocks fall back) is its first occurrence, the one
    before the change (`fold=0`). Raises `ScheduleError` on `timezone` for an unknown zone."""
    tz = zone(timezone)
    first = local.replace(tzinfo=tz, fold=0)
    at_ms = to_ms(first)
    if to_datetime(at_ms).astimezone(tz).replace(tzinfo=None) == local:
        return at_ms
    # In a gap: `fold=0` read it with the offset before the jump, which lands after the jump;
    # the jump itself is the first instant from which the later offset holds.
    after_offset = local.replace(tzinfo=tz, fold=1).utcoffset()
    low_ms, high_ms = to_ms(local.replace(tzinfo=tz, fold=1)), at_ms
    while high_ms - low_ms > 1:
        middle_ms = (low_ms + high_ms) // 2
        if to_datetime(middle_ms).astimezone(tz).utcoffset() == after_offset:
            high_ms = middle_ms
        else:
            low_ms = middle_ms
    return high_ms
