"""The per-host limit and the parking of due timers whose host is full."""

from __future__ import annotations

from timerd.hosts import Entry, HostSlots, host_of


def entry(due: int, host: str = "a.test") -> Entry:
    return Entry(due, f"id-{host}-{due}", host)


def test_host_of_counts_host_and_port_case_blind() -> None:
    assert host_of("https://A.test:8443/x?y=1") == "a.test:8443"
    assert host_of("http://a.test/x") != host_of("http://a.test:81/x")


def test_a_full_host_parks_and_releases_in_batches_earliest_first() -> None:
    slots = HostSlots(per_host=4, park_limit=100)
    taken = [entry(i) for i in range(4)]
    assert all(slots.take(e) for e in taken)
    assert not slots.take(entry(9)) and not slots.take(entry(5))
    assert slots.take(entry(1, host="b.test"))  # another host has its own slots
    assert slots.parked == 2
    assert slots.give_back("a.test") == []  # one free slot: wait for a batch of two
    assert slots.give_back("a.test") == [entry(5), entry(9)]
    assert slots.parked == 0


def test_parking_is_bounded_and_a_full_park_is_skipped_by_polls() -> None:
    slots = HostSlots(per_host=1, park_limit=3)
    assert slots.take(entry(0))
    for due in range(1, 6):
        assert not slots.take(entry(due))
    assert slots.parked == 3  # the rest were dropped: still pending in the store
    assert not slots.wanted(entry(1))  # parked already
    assert not slots.wanted(entry(7))  # its host's park is full
    assert slots.wanted(entry(7, host="b.test"))
    slots.clear_parked()
    assert slots.parked == 0 and slots.wanted(entry(1))


def test_released_entries_hold_their_slots_until_taken() -> None:
    slots = HostSlots(per_host=4, park_limit=100)
    assert all(slots.take(entry(i)) for i in range(4))
    for due in range(10, 20):
        assert not slots.take(entry(due))
    assert slots.give_back("a.test") == []
    released = slots.give_back("a.test")
    assert released == [entry(10), entry(11)]
    assert slots.give_back("a.test") == []  # a third free slot, but two are promised already
    assert slots.give_back("a.test") == [entry(12), entry(13)]  # four free, two promised
    assert all(slots.take(e) for e in [*released, entry(12), entry(13)])
    assert not slots.take(entry(30))  # all four slots in use again
