"""Fault: a daemon holding partitions frozen with SIGSTOP for twice its lease, then let go.

One `timerd api` and two daemons sharing the 64 partitions of one SQLite file (2 s leases;
claims last 3.5 s, so the freeze outlasts both the leases and every claim the frozen daemon
held). A client thread creates 25 timers a second due 0.5-3 s ahead; the receiver takes 0.3 s to
answer, so the frozen daemon has deliveries in flight when it stops. The other daemon must take
its partitions; nothing may be lost or early. Once thawed, the frozen daemon must deliver
nothing a second time except what it had in flight at the stop (claims that come back too late
are released, outcome writes are fenced by the claim token), so only those may arrive twice;
anything else it delivers must be in partitions it took again after the thaw. It must rejoin:
both daemons hold partitions again, and their gauges agree with the `leases` table.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.cluster import TTL_S, ids_in_state, now_ms, start_daemon, store_url
from tests.support.faults import (
    PARTITIONS,
    Figures,
    TimerStream,
    arrived_within,
    claimed_by,
    fired_by,
    holder,
    leases,
    logged,
    report,
    settled_gauges,
    shared,
    taken_over,
    tally,
    wait_quietly,
)
from tests.support.procs import TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.models import State, partition_of

pytestmark = pytest.mark.faults

EVERY_S = 0.04
RECEIVER_DELAY_S = 0.3
FREEZE_S = 2 * TTL_S
AFTER_THAW = 50  # arrivals to wait for after SIGCONT, while the thawed daemon could misbehave
REJOIN_S = 10.0  # bound on the thawed daemon holding partitions again
DAEMON = {
    "TIMERD_POLL_INTERVAL_S": "0.2",
    "TIMERD_CONNECT_TIMEOUT_S": "0.5",
    "TIMERD_DELIVERY_TIMEOUT_S": "1",  # claims last 1 + 0.5 + the 2 s TTL: less than the freeze
    "TIMERD_LOG_LEVEL": "debug",  # a `delivery` line for every attempt, the delivered too
}


def test_a_daemon_frozen_past_its_lease_is_taken_over_and_repeats_only_its_in_flight(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    daemons = [start_daemon(procs, db, **DAEMON), start_daemon(procs, db, lead=False, **DAEMON)]
    names = [holder(d) for d in daemons]
    problems: list[str] = []
    with (
        Receiver(delay_s=RECEIVER_DELAY_S) as receiver,
        TimerStream(api.base_url, receiver.url, every_s=EVERY_S) as stream,
    ):
        wait_until(lambda: shared(db, names), 15, "the daemons to share the partitions out")
        receiver.wait_for(40, timeout_s=15)
        # The holder of p0 (it also purges) freezes.
        p0 = leases(db).partitions[0]
        index = names.index(p0)
        frozen, frozen_name = daemons[index], names[index]
        other_name = names[1 - index]
        frozen.pause()
        frozen_ms = now_ms()
        # Frozen, it writes nothing, and the other daemon waits for its leases to run out
        # before taking (and claiming in) its partitions: this is exactly what it holds.
        at_stop = leases(db)
        theirs = at_stop.of(frozen_name)
        in_flight = claimed_by(db, frozen_name)
        wait_until(lambda: taken_over(db, theirs, frozen_name), FREEZE_S, "the takeover")
        took_over_ms = now_ms() - frozen_ms
        time.sleep(max(0.0, frozen_ms / 1000 + FREEZE_S - time.time()))  # hold the fault
        frozen.resume()
        thawed_ms = now_ms()
        if wait_quietly(lambda: shared(db, names), REJOIN_S):
            rejoined_ms = now_ms() - thawed_ms
        else:
            rejoined_ms = -1
            problems.append(f"the thawed daemon held no partition {REJOIN_S:g} s after SIGCONT")
        wrong = settled_gauges(daemons, names, db)
        if wrong:
            problems.append(f"after the rejoin, metrics disagree with the leases: {wrong}")
        seen = len(receiver.arrivals)
        receiver.wait_for(seen + AFTER_THAW, timeout_s=15)
        due = stream.stop()
        last_due_s = (max(due.values()) - now_ms()) / 1000
        if arrived_within(last_due_s + 20, set(due), receiver):  # else reported as lost
            wait_until(lambda: set(due) <= ids_in_state(db, State.FIRED), 15, "all to be fired")
        arrivals = list(receiver.arrivals)
        end = leases(db).by_holder()
    got = tally(due, arrivals)
    # What the thawed daemon delivered (its `delivery` log line is written once an attempt
    # ends, so a delivery in flight at the freeze is logged after the thaw as well), and the
    # partitions it took again after the thaw.
    after_thaw = [e["timer_id"] for e in logged(frozen, "delivery") if e["at_ms"] >= thawed_ms]
    retaken = {
        e["partition"] for e in logged(frozen, "partition_acquired") if e["at_ms"] >= thawed_ms
    }
    repeated_in_flight = {i for i in after_thaw if i in in_flight}
    elsewhere = {
        i for i in after_thaw if i not in in_flight and partition_of(i, PARTITIONS) not in retaken
    }
    firers = fired_by(db)
    unfenced = {i for i in got.duplicates & in_flight if firers.get(i) == frozen_name}
    if got.lost:
        problems.append(f"{len(got.lost)} acknowledged timer(s) never arrived")
    if got.early:
        problems.append(f"{len(got.early)} arrived early (id, ms early): {got.early[:3]}")
    if got.duplicates - in_flight:
        problems.append(f"{len(got.duplicates - in_flight)} repeated although not in flight")
    if elsewhere:
        problems.append(
            f"the thawed daemon delivered {len(elsewhere)} timer(s) neither in flight at the stop"
            " nor in a partition it took again"
        )
    if unfenced:
        problems.append(
            f"{len(unfenced)} timer(s) delivered twice kept the thawed daemon's outcome"
            " (its write was not fenced)"
        )
    if not frozen.running():
        problems.append("the thawed daemon exited")
    if not theirs:
        problems.append("the frozen daemon held no partition at the stop")
    report(
        Figures(
            test="daemon SIGSTOP 2xTTL (2 daemons, 64 partitions)",
            timers=got.timers,
            faults=f"SIGSTOP {FREEZE_S:g} s, SIGCONT",
            lost=len(got.lost),
            duplicates=len(got.duplicates),
            early=len(got.early),
            takeover_ms=[took_over_ms],
            extra={
                "partitions_frozen": len(theirs),
                "in_flight_at_stop": len(in_flight),
                "thawed_finished_in_flight": len(repeated_in_flight),
                "thawed_new_deliveries": len(set(after_thaw) - in_flight),
                "thawed_claims_released": len(
                    [e for e in logged(frozen, "claim_released") if e["at_ms"] >= thawed_ms]
                ),
                "rejoined_ms": rejoined_ms,
                "partitions_at_end": f"{len(end.get(frozen_name, ()))}+"
                f"{len(end.get(other_name, ()))}",
                "refused_creates": sum(stream.refused.values()),
            },
            problems=problems,
        )
    )
    assert not problems, "\n".join(problems)
    assert stream.refused.total() == 0, f"creates refused: {dict(stream.refused)}"
