"""Fault: the leading daemon frozen with SIGSTOP for twice its lease, then let go with SIGCONT.

One `timerd api`, a leader and a standby on one SQLite file (2 s lease; claims last 3.5 s, so
the freeze outlasts both the lease and every claim the leader held). A client thread creates
25 timers a second due 0.5-3 s ahead; the receiver takes 0.3 s to answer, so the leader has
deliveries in flight when it freezes. The standby must take over; nothing may be lost or early;
once thawed, the old leader must deliver nothing but what it had in flight when it froze (its
claims at that moment), and only those may arrive twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cluster import TTL_S, ids_in_state, leader_pid, now_ms, start_daemon, store_url
from tests.support.faults import Figures, TimerStream, arrived_within, logged, report, tally
from tests.support.procs import TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.models import State

pytestmark = pytest.mark.faults

EVERY_S = 0.04
RECEIVER_DELAY_S = 0.3
FREEZE_S = 2 * TTL_S
AFTER_THAW = 50  # arrivals to wait for after SIGCONT, while the thawed daemon could misbehave
DAEMON = {
    "TIMERD_POLL_INTERVAL_S": "0.2",
    "TIMERD_CONNECT_TIMEOUT_S": "0.5",
    "TIMERD_DELIVERY_TIMEOUT_S": "1",  # claims last 1 + 0.5 + the 2 s TTL: less than the freeze
}


def test_a_leader_frozen_past_its_lease_is_replaced_and_repeats_only_its_in_flight(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    leader = start_daemon(procs, db, **DAEMON)
    standby = start_daemon(procs, db, lead=False, **DAEMON)
    problems: list[str] = []
    with (
        Receiver(delay_s=RECEIVER_DELAY_S) as receiver,
        TimerStream(api.base_url, receiver.url, every_s=EVERY_S) as stream,
    ):
        receiver.wait_for(40, timeout_s=15)
        leader.pause()
        frozen_ms = now_ms()
        # Frozen, the leader writes nothing and the standby waits for its lease to run out:
        # this is exactly what it holds claimed.
        in_flight = ids_in_state(db, State.FIRING)
        wait_until(lambda: leader_pid(db) == standby.pid, FREEZE_S, "the standby to take over")
        took_over_ms = now_ms() - frozen_ms
        time.sleep(max(0.0, frozen_ms / 1000 + FREEZE_S - time.time()))  # hold the fault
        leader.resume()
        thawed_ms = now_ms()
        seen = len(receiver.arrivals)
        receiver.wait_for(seen + AFTER_THAW, timeout_s=15)
        due = stream.stop()
        last_due_s = (max(due.values()) - now_ms()) / 1000
        if arrived_within(last_due_s + 20, set(due), receiver):  # else reported as lost
            wait_until(lambda: set(due) <= ids_in_state(db, State.FIRED), 15, "all to be fired")
        arrivals = list(receiver.arrivals)
    got = tally(due, arrivals)
    # What the thawed daemon delivered (its `delivery` log line is written once an attempt
    # ends, so a delivery in flight at the freeze is logged after the thaw as well).
    after_thaw = {e["timer_id"] for e in logged(leader, "delivery") if e["at_ms"] >= thawed_ms}
    if got.lost:
        problems.append(f"{len(got.lost)} acknowledged timer(s) never arrived")
    if got.early:
        problems.append(f"{len(got.early)} arrived early (id, ms early): {got.early[:3]}")
    if got.duplicates - in_flight:
        problems.append(f"{len(got.duplicates - in_flight)} repeated although not in flight")
    if after_thaw - in_flight:
        problems.append(f"the thawed daemon delivered {len(after_thaw - in_flight)} new timer(s)")
    if not leader.running():
        problems.append("the thawed daemon exited")
    elif leader_pid(db) != standby.pid:
        problems.append("the thawed daemon took the lease back from the standby")
    report(
        Figures(
            test="leader SIGSTOP 2xTTL",
            timers=got.timers,
            faults=f"SIGSTOP {FREEZE_S:g} s, SIGCONT",
            lost=len(got.lost),
            duplicates=len(got.duplicates),
            early=len(got.early),
            takeover_ms=[took_over_ms],
            extra={
                "in_flight_at_stop": len(in_flight),
                "delivered_by_thawed": len(after_thaw),
                "refused_creates": sum(stream.refused.values()),
            },
            problems=problems,
        )
    )
    assert not problems, "\n".join(problems)
    assert stream.refused.total() == 0, f"creates refused: {dict(stream.refused)}"
