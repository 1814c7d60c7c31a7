"""The retry policy: what is retryable, the schedule, Retry-After."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from timerd.errors import ConfigError
from timerd.retry import RetryPolicy, Verdict, classify, parse_retry_after, parse_schedule

NOW_MS = 1_800_000_000_000


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (None, Verdict.RETRY),
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (301, Verdict.RETRY),
        (308, Verdict.RETRY),
        (408, Verdict.RETRY),
        (425, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (400, Verdict.PERMANENT),
        (401, Verdict.PERMANENT),
        (404, Verdict.PERMANENT),
        (410, Verdict.PERMANENT),
        (422, Verdict.PERMANENT),
    ],
)
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_parse_schedule_reads_units() -> None:
    assert parse_schedule("500ms, 5s,5m,2h,1d,1.5s") == (0.5, 5.0, 300.0, 7200.0, 86400.0, 1.5)


@pytest.mark.parametrize("text", ["", "5", "5x", "-1s", "1s,,2s", "s"])
def test_a_bad_schedule_names_its_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="TIMERD_RETRY_SCHEDULE"):
        parse_schedule(text)


def test_the_default_schedule_retries_for_about_a_day() -> None:
    policy = RetryPolicy.from_setting("5s,5m,30m,2h,5h,10h,10h")
    assert policy.max_attempts == 8
    assert 27 * 3600 < sum(policy.schedule_s) < 29 * 3600


def test_delays_follow_the_schedule_with_jitter_and_stop_at_the_budget() -> None:
    policy = RetryPolicy((10.0, 100.0))
    first = policy.next_due_ms(1, None, NOW_MS)
    second = policy.next_due_ms(2, None, NOW_MS)
    assert first is not None and NOW_MS + 9_000 <= first <= NOW_MS + 11_000
    assert second is not None and NOW_MS + 90_000 <= second <= NOW_MS + 110_000
    assert policy.next_due_ms(3, None, NOW_MS) is None
    longer = policy.next_due_ms(3, 5, NOW_MS)  # the last delay repeats for a bigger budget
    assert longer is not None and NOW_MS + 90_000 <= longer <= NOW_MS + 110_000
    assert policy.next_due_ms(1, 1, NOW_MS) is None


def test_retry_after_replaces_the_schedule_within_bounds() -> None:
    policy = RetryPolicy((10.0,))
    assert policy.next_due_ms(1, None, NOW_MS, 30.0) == NOW_MS + 30_000
    assert policy.next_due_ms(1, None, NOW_MS, 0.0) == NOW_MS + 1_000
    assert policy.next_due_ms(1, None, NOW_MS, 1e12) == NOW_MS + 86_400_000


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Fri, 15 Jan 2027 08:00:00 GMT", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("-5", None),
        ("1.5", None),
        ("²", None),  # "²".isdigit() holds, float("²") raises
        ("\u0661", None),  # ARABIC-INDIC DIGIT ONE, likewise
        ("\uff17", None),  # FULLWIDTH DIGIT SEVEN, which float() would read as 7
        ("1e3", None),
        ("NaN", None),
        ("inf", None),
        ("9" * 400, 86_400.0),  # float() of it is inf: cut to the longest wait there is
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    if header and header.startswith("Fri"):
        now_ms = 1_800_000_000_000  # 2027-01-15T08:00:00Z
        assert parse_retry_after(header, now_ms - 60_000) == pytest.approx(60.0)
    else:
        assert parse_retry_after(header, NOW_MS) == seconds


RETRY_AFTER_EDGES = [
    "²",
    "Fri, 15 Jan 99999 08:00:00 GMT",
    "Fri, 15 Jan 0000 08:00:00 GMT",
    "Fri, 15 Jan 2027 08:00:00 +9999",
    "Fri, 15 Jan 2027 99:99:99 GMT",
    "Fri, 31 Feb 2027 08:00:00 GMT",
    "0, 0 0 0 0:0:0",
    ", , , ,",
    "\x00",
]


@settings(max_examples=2000, deadline=None, database=None)
@given(header=st.text() | st.sampled_from(RETRY_AFTER_EDGES))
@example(header="")
def test_parse_retry_after_never_raises_and_is_none_or_finite(header: str) -> None:
    seconds = parse_retry_after(header, NOW_MS)
    assert seconds is None or math.isfinite(seconds)
    policy = RetryPolicy((10.0,))
    due = policy.next_due_ms(1, None, NOW_MS, seconds)  # whatever came back can be scheduled
    assert due is not None and NOW_MS + 1_000 <= due <= NOW_MS + 86_400_000
