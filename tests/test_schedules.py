"""The trigger glue (`timerd/schedules.py`) and the judging of a series' attempts: every time is
passed in (an injected clock), and the expected occurrences are pinned UTC instants, checked
against APScheduler's own triggers as well."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from timerd.delivery import Attempt, webhook_body
from timerd.models import State, Timer, new_timer_id
from timerd.outcomes import judge
from timerd.retry import RetryPolicy
from timerd.schedules import (
    Schedule,
    ScheduleError,
    cron_trigger,
    local_to_ms,
    missed_by,
    next_occurrence,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(text: str) -> int:
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(milliseconds=1)


def utc(ms_: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms_)).strftime("%Y-%m-%dT%H:%M:%SZ")


def occurrences(expr: str, tz: str, from_utc: str, count: int = 5) -> list[str]:
    schedule = Schedule(cron=expr, timezone=tz)
    first = schedule.first_from(ms(from_utc))
    assert first is not None
    return [utc(t) for t in schedule.upcoming(1, first, count)]


def apscheduler_says(expr: str, tz: str, from_utc: str, count: int = 5) -> list[str]:
    """APScheduler's own trigger, asked directly (the crontab's numeric weekdays aside)."""
    trigger = CronTrigger.from_crontab(expr, timezone=ZoneInfo(tz))
    moment = trigger.get_next_fire_time(None, datetime.fromisoformat(from_utc))
    times = []
    for _ in range(count):
        times.append(moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        now = moment.astimezone(UTC) + timedelta(microseconds=1)  # real time, not wall time
        moment = trigger.get_next_fire_time(moment, now)
    return times


DST_CASES = {
    # Berlin springs forward on 2026-03-29 at 02:00 (CET → CEST): 02:30 does not exist that
    # day, and the occurrence comes at 03:30 CEST.
    "berlin spring forward": (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-03-27T12:00:00+00:00",
        ["2026-03-28T01:30:00Z", "2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"],
    ),
    # Berlin falls back on 2026-10-25 at 03:00 (CEST → CET): 02:30 happens twice, and
    # APScheduler fires at both.
    "berlin fall back": (
        "30 2 * * *",
        "Europe/Berlin",
        "2026-10-23T12:00:00+00:00",
        [
            "2026-10-24T00:30:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-26T01:30:00Z",
        ],
    ),
    # New York springs forward on 2026-03-08 at 02:00 (EST → EDT).
    "new york spring forward": (
        "30 2 * * *",
        "America/New_York",
        "2026-03-06T12:00:00+00:00",
        ["2026-03-07T07:30:00Z", "2026-03-08T07:30:00Z", "2026-03-09T06:30:00Z"],
    ),
    # New York falls back on 2026-11-01 at 02:00 (EDT → EST): 01:30 happens twice.
    "new york fall back": (
        "30 1 * * *",
        "America/New_York",
        "2026-10-30T12:00:00+00:00",
        [
            "2026-10-31T05:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-02T06:30:00Z",
        ],
    ),
    "weekdays at nine in berlin across the change": (
        "0 9 * * MON-FRI",
        "Europe/Berlin",
        "2026-03-26T12:00:00+00:00",
        ["2026-03-27T08:00:00Z", "2026-03-30T07:00:00Z", "2026-03-31T07:00:00Z"],
    ),
}


@pytest.mark.parametrize(("expr", "tz", "start", "expected"), DST_CASES.values(), ids=DST_CASES)
def test_cron_occurrences_across_daylight_saving_are_pinned_and_apschedulers(
    expr: str, tz: str, start: str, expected: list[str]
) -> None:
    assert occurrences(expr, tz, start, len(expected)) == expected
    assert apscheduler_says(expr, tz, start, len(expected)) == expected


FIELD_CASES = {
    "every 15 minutes within a range of hours": (
        "*/15 9-10 * * *",
        [
            "2026-01-01T09:00:00Z",
            "2026-01-01T09:15:00Z",
            "2026-01-01T09:30:00Z",
            "2026-01-01T09:45:00Z",
            "2026-01-01T10:00:00Z",
        ],
    ),
    "month names": (
        "0 0 1 JAN,JUL *",
        ["2026-01-01T00:00:00Z", "2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"],
    ),
    "a day of week by name": (
        "0 12 * * SUN",
        ["2026-01-04T12:00:00Z", "2026-01-11T12:00:00Z"],
    ),
    "a day of week by crontab number: 0 is Sunday": (
        "0 12 * * 0",
        ["2026-01-04T12:00:00Z", "2026-01-11T12:00:00Z"],
    ),
    "7 is Sunday too": ("0 12 * * 7", ["2026-01-04T12:00:00Z"]),
    "a numeric weekday range": (
        "0 6 * * 1-5",
        ["2026-01-01T06:00:00Z", "2026-01-02T06:00:00Z", "2026-01-05T06:00:00Z"],
    ),
    "a weekday step": (  # crontab's */3: Sunday, Wednesday, Saturday
        "0 0 * * */3",
        ["2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z", "2026-01-07T00:00:00Z"],
    ),
}


@pytest.mark.parametrize(("expr", "expected"), FIELD_CASES.values(), ids=FIELD_CASES)
def test_cron_fields_mean_what_crontab_means(expr: str, expected: list[str]) -> None:
    assert occurrences(expr, "UTC", "2026-01-01T00:00:00+00:00", len(expected)) == expected


def test_names_and_steps_are_apschedulers_exactly() -> None:
    for expr in ("*/15 9-10 * * *", "0 0 1 JAN,JUL *", "0 9 * * MON-FRI", "5 4 * * SUN"):
        start = "2026-01-01T00:00:00+00:00"
        assert occurrences(expr, "UTC", start) == apscheduler_says(expr, "UTC", start)


@pytest.mark.parametrize(
    ("expr", "tz", "field"),
    [
        ("* * * *", "UTC", "cron"),
        ("61 * * * *", "UTC", "cron"),
        ("* * * * FUNDAY", "UTC", "cron"),
        ("* * * * 9", "UTC", "cron"),
        ("0 0 * * *", "Mars/Olympus_Mons", "timezone"),
        ("0 0 * * *", "../etc/passwd", "timezone"),
    ],
)
def test_invalid_cron_and_zones_name_the_field(expr: str, tz: str, field: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        cron_trigger(expr, tz)
    assert caught.value.field == field


def test_an_impossible_date_has_no_occurrence() -> None:
    assert Schedule(cron="0 0 30 2 *").first_from(ms("2026-01-01T00:00:00+00:00")) is None


def test_an_interval_counts_from_its_start_and_never_drifts() -> None:
    start = ms("2026-01-01T00:00:00+00:00")
    every = Schedule(every_ms=1500, start_at_ms=start)
    assert every.first_from(start - 10_000) == start
    assert every.first_from(start + 1) == start + 1500
    assert every.following(start + 3000) == start + 4500
    assert every.upcoming(1, start, 3) == [start, start + 1500, start + 3000]


def test_until_and_max_occurrences_end_a_series() -> None:
    start = ms("2026-01-01T00:00:00+00:00")
    capped = Schedule(every_ms=1000, start_at_ms=start, max_occurrences=3)
    assert capped.upcoming(1, start, 5) == [start, start + 1000, start + 2000]
    assert capped.next_after(3, start + 2000, 0) is None
    until = Schedule(every_ms=1000, start_at_ms=start, until_ms=start + 1500)
    assert until.upcoming(1, start, 5) == [start, start + 1000]


def series(schedule: Schedule, occurrence: int, at_ms: int, **fields: object) -> Timer:
    return Timer(
        id=new_timer_id(),
        url="https://r.example/h",
        due_at_ms=at_ms,
        created_at_ms=at_ms - 1000,
        attempts=1,
        claim_token="claim",
        schedule=schedule.to_json(),
        occurrence=occurrence,
        occurrence_at_ms=at_ms,
        **fields,  # type: ignore[arg-type]
    )


START = ms("2026-06-01T00:00:00+00:00")
EVERY_MINUTE = Schedule(every_ms=60_000, start_at_ms=START)
POLICY = RetryPolicy.from_setting("1s,5s")


def test_a_delivered_occurrence_moves_the_series_on_from_its_schedule_not_its_firing() -> None:
    timer = series(EVERY_MINUTE, 4, START + 180_000)
    late_ms = START + 180_000 + 2_500  # fired 2.5 s late: the next is still on the minute
    outcome = judge(timer, Attempt(late_ms, 3.0, status=200), POLICY, late_ms + 3)
    assert (outcome.state, outcome.next_occurrence, outcome.next_due_at_ms) == (
        State.PENDING,
        5,
        START + 240_000,
    )
    assert outcome.delivered and not outcome.occurrence_failed


def test_a_failed_occurrence_is_retried_then_counted_and_the_series_goes_on() -> None:
    timer = series(EVERY_MINUTE, 1, START)
    retry = judge(timer, Attempt(START, 1.0, status=503), POLICY, START + 1)
    assert (retry.state, retry.next_occurrence, retry.occurrence_failed) == (
        State.PENDING,
        None,
        False,
    )
    spent = dataclasses.replace(timer, attempts=3)
    failed = judge(spent, Attempt(START + 7000, 1.0, status=503), POLICY, START + 7001)
    assert (failed.state, failed.next_occurrence, failed.next_due_at_ms) == (
        State.PENDING,
        2,
        START + 60_000,
    )
    assert failed.occurrence_failed and not failed.delivered
    gone = judge(timer, Attempt(START, 1.0, status=410), POLICY, START + 1)
    assert (gone.next_occurrence, gone.occurrence_failed) == (2, True)


def test_the_last_occurrence_ends_the_series_as_a_one_off_would() -> None:
    last = series(dataclasses.replace(EVERY_MINUTE, max_occurrences=2), 2, START + 60_000)
    done = judge(last, Attempt(START + 60_000, 1.0, status=200), POLICY, START + 60_001)
    assert (done.state, done.next_occurrence) == (State.FIRED, None)
    failed = judge(last, Attempt(START + 60_000, 1.0, status=410), POLICY, START + 60_001)
    assert (failed.state, failed.occurrence_failed) == (State.FAILED, True)


def test_catch_up_once_fires_once_for_the_missed_and_carries_on_in_the_future() -> None:
    timer = series(EVERY_MINUTE, 3, START + 120_000)
    back_ms = START + 120_000 + 3 * 60_000 + 10_000  # three more came due while all were down
    assert missed_by(timer, back_ms) == 3
    assert next_occurrence(timer, back_ms) == (7, START + 360_000)
    body = webhook_body(timer, missed_by(timer, back_ms))
    assert b'"occurrence":3' in body and b'"missed":3' in body


def test_catch_up_all_fires_each_missed_occurrence() -> None:
    timer = series(dataclasses.replace(EVERY_MINUTE, catch_up="all"), 3, START + 120_000)
    back_ms = START + 120_000 + 3 * 60_000 + 10_000
    assert missed_by(timer, back_ms) == 0
    assert next_occurrence(timer, back_ms) == (4, START + 180_000)


def test_a_cron_catch_up_counts_the_occurrences_it_covers() -> None:
    hourly = Schedule(cron="0 * * * *", timezone="Europe/Berlin")
    timer = series(hourly, 1, START)
    assert missed_by(timer, START + 5 * 3_600_000 + 1) == 5
    assert next_occurrence(timer, START + 5 * 3_600_000 + 1) == (7, START + 6 * 3_600_000)


def test_each_occurrence_has_its_own_webhook_id() -> None:
    timer = series(EVERY_MINUTE, 7, START)
    assert timer.webhook_id == f"{timer.id}_7"
    assert dataclasses.replace(timer, schedule=None).webhook_id == timer.id


LOCAL_CASES = {
    "an ordinary day": ("2026-12-24T09:00:00", "Europe/Berlin", "2026-12-24T08:00:00Z"),
    # 02:00-03:00 does not exist in Berlin on 2026-03-29: forward to the jump, 03:00 CEST.
    "berlin spring forward": ("2026-03-29T02:30:00", "Europe/Berlin", "2026-03-29T01:00:00Z"),
    # 02:00-03:00 happens twice in Berlin on 2026-10-25: the first, still CEST.
    "berlin fall back": ("2026-10-25T02:30:00", "Europe/Berlin", "2026-10-25T00:30:00Z"),
    "new york spring forward": ("2026-03-08T02:30:00", "America/New_York", "2026-03-08T07:00:00Z"),
    "new york fall back": ("2026-11-01T01:30:00", "America/New_York", "2026-11-01T05:30:00Z"),
}


@pytest.mark.parametrize(("local", "tz", "expected"), LOCAL_CASES.values(), ids=LOCAL_CASES)
def test_local_times_in_gaps_move_forward_and_repeated_ones_take_the_first(
    local: str, tz: str, expected: str
) -> None:
    assert utc(local_to_ms(datetime.fromisoformat(local), tz)) == expected
