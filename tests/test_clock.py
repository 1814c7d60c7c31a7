"""The store-corrected clock: never ahead of the store's, as precise as its best recent reading,
and quick to follow a clock that steps."""

from __future__ import annotations

import pytest

from tests.test_daemon import FakeClock
from timerd.clock import MAX_SAMPLE_RTT_MS, StoreClock

STORE_AHEAD_MS = 30_000


def clock() -> tuple[FakeClock, StoreClock]:
    local = FakeClock()
    return local, StoreClock(local, 60_000)


@pytest.mark.parametrize("there_ms", [0, 100, 250, 400])  # how the 400 ms round trip splits
def test_the_corrected_clock_is_never_ahead_of_the_stores(there_ms: int) -> None:
    local, corrected = clock()
    sent_ms = local.now_ms()
    store_ms = sent_ms + there_ms + STORE_AHEAD_MS  # the store read its clock on arrival
    assert corrected.observe(sent_ms, store_ms, sent_ms + 400)
    local.advance(400)
    true_store_now_ms = local.now_ms() + STORE_AHEAD_MS
    assert true_store_now_ms - 400 <= corrected.now_ms() <= true_store_now_ms


def test_the_most_precise_recent_reading_wins() -> None:
    local, corrected = clock()
    for round_trip_ms in (300, 4, 80):
        sent_ms = local.now_ms()
        corrected.observe(
            sent_ms, sent_ms + round_trip_ms // 2 + STORE_AHEAD_MS, sent_ms + round_trip_ms
        )
        local.advance(round_trip_ms)
    assert (corrected.offset_ms, corrected.error_ms) == (STORE_AHEAD_MS, 2)


def test_a_stepped_clock_discards_the_readings_before_the_step() -> None:
    local, corrected = clock()
    corrected.observe(local.now_ms(), local.now_ms() + STORE_AHEAD_MS, local.now_ms())
    local.advance(-5_000)  # NTP stepped this host's clock back
    corrected.observe(local.now_ms(), local.now_ms() + STORE_AHEAD_MS + 5_000, local.now_ms() + 50)
    assert corrected.offset_ms == STORE_AHEAD_MS + 5_000 - 25


def test_a_slow_reading_is_ignored_and_no_reading_means_not_fit_to_lead() -> None:
    _, corrected = clock()
    assert not corrected.trusted
    assert not corrected.observe(0, 1, MAX_SAMPLE_RTT_MS + 1)
    assert not corrected.synced
    assert corrected.observe(0, None, 5)  # a store on this host: nothing to correct
    assert (corrected.offset_ms, corrected.error_ms, corrected.trusted) == (0, 0, True)
