"""Fault: a daemon holding partitions killed with SIGKILL ten times under a stream of timers.

One `timerd api`, two `timerd daemon`s (one process each) sharing the 64 partitions of one
SQLite file, 2 s leases. A client thread creates 25 timers a second, each due 0.5-3 s ahead, to
its own path on one loopback receiver that takes 0.1 s to answer (so deliveries are in flight
at every kill). Each cycle waits until the live daemons have shared the partitions out, picks a
victim (the holder of p0, then one that does not hold it, in turn), kills it, starts a
replacement and measures the takeover: kill → every partition the dead daemon held is held by a
live one (the `leases` table). At the end every acknowledged timer must have arrived, none
early, and a timer may arrive twice only if a killed daemon had it claimed (`firing` with its
holder in `claimed_by`) at the moment it died.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster import (
    FAST,
    POLL_S,
    TTL_S,
    ids_in_state,
    now_ms,
    start_daemon,
    store_url,
)
from tests.support.faults import (
    PARTITIONS,
    Figures,
    TimerStream,
    arrived_within,
    claimed_by,
    fired_by,
    holder,
    leases,
    report,
    settled_gauges,
    shared,
    spread,
    store_partitions,
    taken_over,
    tally,
    wait_quietly,
)
from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until
from timerd.models import State, partition_of

pytestmark = pytest.mark.faults

CYCLES = 10
EVERY_S = 0.04  # 25 timers a second
RECEIVER_DELAY_S = 0.1
DAEMON = {"TIMERD_POLL_INTERVAL_S": "0.2"}  # over cluster.FAST: 2 s lease, renewed every 0.5 s
# A lease can have up to a TTL to run at the kill; the others look every 0.2 s (the lease tick
# is min(renew, poll)), and a partition is free once both its lease and the dead daemon's
# membership have expired.
TAKEOVER_BOUND_MS = int((TTL_S + 0.2 + 1.0) * 1000)


@dataclass
class Kill:
    at_ms: int
    victim: str
    held_p0: bool
    partitions: set[int]  # what it held when it died
    in_flight: set[str]  # what it had claimed and not settled when it died
    takeover_ms: int = 0


def test_ten_kills_of_a_partition_holder_lose_nothing_and_repeat_only_what_was_in_flight(
    procs: TimerdProcesses, db: Path
) -> None:
    assert float(FAST["TIMERD_LEASE_TTL_S"]) == TTL_S and POLL_S >= 0.2
    rng = random.Random(9)
    api = procs.start("api", store_url(db))
    daemons = [start_daemon(procs, db, **DAEMON), start_daemon(procs, db, lead=False, **DAEMON)]
    assert store_partitions(db) == PARTITIONS
    names = {d: holder(d) for d in daemons}
    kills: list[Kill] = []
    problems: list[str] = []
    with (
        Receiver(delay_s=RECEIVER_DELAY_S) as receiver,
        TimerStream(api.base_url, receiver.url, every_s=EVERY_S) as stream,
    ):
        for cycle in range(CYCLES):
            live = [names[d] for d in daemons]
            wait_until(lambda ns=live: shared(db, ns), 15, "the live daemons to share out")
            wrong = settled_gauges(daemons, live, db)
            if wrong:
                problems.append(f"cycle {cycle}: metrics disagree with the leases: {wrong}")
            # Let the daemons fire a varying number of timers, so kills land at varying phases
            # of lease renewals and deliveries.
            seen = len(receiver.arrivals) + rng.randint(5, 30)
            wait_until(lambda n=seen: len(receiver.arrivals) >= n, 10, "the daemons to fire")
            victim = pick(cycle, daemons, names, db)
            killed_ms = now_ms()
            assert victim.kill() == -9
            # The dead daemon writes nothing more, and no other may take its partitions (nor
            # claim in them) before their leases expire: this is exactly what it held and had
            # claimed and not recorded as done.
            dead, held = names[victim], leases(db)
            kill = Kill(
                at_ms=killed_ms,
                victim=dead,
                held_p0=held.partitions.get(0) == dead,
                partitions=held.of(dead),
                in_flight=claimed_by(db, dead),
            )
            kills.append(kill)
            daemons.remove(victim)
            spare = procs.start("daemon", store_url(db), env=FAST | DAEMON, ready=False)
            daemons.append(spare)
            wait_until(lambda k=kill: taken_over(db, k.partitions, k.victim), 10, "the takeover")
            kill.takeover_ms = now_ms() - killed_ms
            # The next kill needs the replacement up (its /healthz answers once its metrics
            # server is).
            spare.wait_ready()
            names[spare] = holder(spare)
        due = stream.stop()
        last_due_s = (max(due.values()) - now_ms()) / 1000
        if arrived_within(last_due_s + 20, set(due), receiver):  # else reported as lost
            wait_until(lambda: set(due) <= ids_in_state(db, State.FIRED), 15, "all to be fired")
        arrivals = list(receiver.arrivals)
        live = [names[d] for d in daemons]
        if not wait_quietly(lambda: shared(db, live), 15):
            problems.append(f"the live daemons did not share the partitions out: {leases(db)}")
        wrong = settled_gauges(daemons, live, db)
        if wrong:
            problems.append(f"at the end, metrics disagree with the leases: {wrong}")
    got = tally(due, arrivals)
    in_flight = set().union(*(k.in_flight for k in kills))
    unexplained = got.duplicates - in_flight
    firers = fired_by(db)
    takeover_ms = [k.takeover_ms for k in kills]
    resumed_ms = [resumed(k, arrivals) for k in kills]
    if got.lost:
        problems.append(f"{len(got.lost)} acknowledged timer(s) never arrived")
    if got.early:
        problems.append(f"{len(got.early)} arrived early (id, ms early): {got.early[:3]}")
    if unexplained:
        problems.append(f"{len(unexplained)} repeated although not in flight at a kill")
    if any(not k.partitions for k in kills):
        problems.append("a victim held no partition when it was killed")
    slow = [ms for ms in takeover_ms if ms > TAKEOVER_BOUND_MS]
    if slow:
        problems.append(f"takeovers slower than {TAKEOVER_BOUND_MS} ms: {slow}")
    if missing := set(due) & {i for i, by in firers.items() if by is None}:
        problems.append(f"{len(missing)} fired timer(s) with no fired_by")
    report(
        Figures(
            test="daemon kill -9 x10 (2 daemons, 64 partitions)",
            timers=got.timers,
            faults=f"{CYCLES} x SIGKILL of a daemon holding partitions",
            lost=len(got.lost),
            duplicates=len(got.duplicates),
            early=len(got.early),
            takeover_ms=takeover_ms,
            extra={
                "in_flight_at_kills": len(in_flight),
                "partitions_per_victim": spread([len(k.partitions) for k in kills]),
                "victims_holding_p0": sum(k.held_p0 for k in kills),
                "delivery_resumed_ms": spread([ms for ms in resumed_ms if ms is not None]),
                "fired_by_daemons": len({by for i, by in firers.items() if i in due}),
                "refused_creates": sum(stream.refused.values()),
            },
            problems=problems,
        )
    )
    assert not problems, "\n".join(problems)
    assert stream.refused.total() == 0, f"creates refused: {dict(stream.refused)}"


def pick(
    cycle: int, daemons: list[TimerdProcess], names: dict[TimerdProcess, str], db: Path
) -> TimerdProcess:
    """The holder of p0 on even cycles (it also purges), one that does not hold it on odd ones;
    either way a daemon holding partitions."""
    now = leases(db)
    p0 = now.partitions.get(0)
    holding = [d for d in daemons if now.of(names[d])]
    choice = [d for d in holding if (names[d] == p0) == (cycle % 2 == 0)] or holding
    assert choice, f"no live daemon holds a partition: {now}"
    return choice[0]


def resumed(kill: Kill, arrivals: list[Arrival]) -> int | None:
    """Kill → the first arrival of a timer in one of the dead daemon's partitions that it had
    not claimed (bytes it sent just before dying may still reach the receiver after the kill)."""
    fresh = [
        a.at_ms
        for a in arrivals
        if a.at_ms >= kill.at_ms
        and a.timer_id not in kill.in_flight
        and partition_of(a.timer_id, PARTITIONS) in kill.partitions
    ]
    return min(fresh) - kill.at_ms if fresh else None
