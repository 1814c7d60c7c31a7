"""Fault: the leading daemon killed with SIGKILL ten times under a steady stream of timers.

One `timerd api`, two `timerd daemon`s on one SQLite file with a 2 s lease. A client thread
creates 25 timers a second, each due 0.5-3 s ahead, to its own path on one loopback receiver
that takes 0.1 s to answer (so deliveries are in flight at every kill). Each cycle finds the
leader in the lease row, kills it, starts a replacement daemon and measures the takeover. At
the end every acknowledged timer must have arrived, none early, and a timer may arrive twice
only if the leader killed had it claimed (`firing`) at the moment it died.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.cluster import (
    FAST,
    POLL_S,
    TTL_S,
    ids_in_state,
    leader_pid,
    now_ms,
    start_daemon,
    store_url,
)
from tests.support.faults import (
    Figures,
    TimerStream,
    arrived_within,
    gauge,
    logged,
    report,
    spread,
    tally,
)
from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.models import State

pytestmark = pytest.mark.faults

CYCLES = 10
EVERY_S = 0.04  # 25 timers a second
RECEIVER_DELAY_S = 0.1
DAEMON = {"TIMERD_POLL_INTERVAL_S": "0.2"}  # over cluster.FAST: 2 s lease, renewed every 0.5 s
# The lease can have up to a TTL to run at the kill; the standby tries every poll interval.
TAKEOVER_BOUND_MS = int((TTL_S + 0.2 + 1.0) * 1000)


def test_ten_leader_kills_lose_nothing_and_repeat_only_what_was_in_flight(
    procs: TimerdProcesses, db: Path
) -> None:
    assert float(FAST["TIMERD_LEASE_TTL_S"]) == TTL_S and POLL_S >= 0.2
    rng = random.Random(9)
    api = procs.start("api", store_url(db))
    daemons = [start_daemon(procs, db, **DAEMON), start_daemon(procs, db, lead=False, **DAEMON)]
    in_flight: set[str] = set()  # every timer a killed leader had claimed when it died
    lease_ms: list[int] = []
    resumed_ms: list[int] = []
    problems: list[str] = []
    with (
        Receiver(delay_s=RECEIVER_DELAY_S) as receiver,
        TimerStream(api.base_url, receiver.url, every_s=EVERY_S) as stream,
    ):
        for _ in range(CYCLES):
            leader = leading(db, daemons)
            # Let the leader fire a varying number of timers, so kills land at varying phases
            # of its lease renewals and deliveries.
            seen = len(receiver.arrivals) + rng.randint(5, 30)
            wait_until(lambda n=seen: len(receiver.arrivals) >= n, 10, "the leader to fire")
            killed_ms = now_ms()
            assert leader.kill() == -9
            # The dead leader writes nothing more and no standby may claim before its lease
            # expires: this is exactly what it had claimed and not recorded as done.
            dying = ids_in_state(db, State.FIRING)
            in_flight |= dying
            daemons = [d for d in daemons if d is not leader]
            spare = procs.start("daemon", store_url(db), env=FAST | DAEMON, ready=False)
            daemons.append(spare)
            new = wait_until(
                lambda ds=daemons: new_leader(db, ds), 10, "a standby to take the lease"
            )
            lease_ms.append(acquired_ms(new) - killed_ms)
            first = wait_until(
                lambda k=killed_ms, d=dying: first_arrival_after(receiver, k, d), 10, "a delivery"
            )
            resumed_ms.append(first - killed_ms)
            # The next kill needs a standby ready to take over (its /healthz answers once its
            # metrics server is up).
            spare.wait_ready()
            wait_until(lambda s=spare: '"daemon_started"' in s.stderr(), 10, "the spare to start")
            wait_until(lambda n=new: gauge(n, "timerd_leader") == 1.0, 5, "timerd_leader 1")
            others = [gauge(d, "timerd_leader") for d in daemons if d is not new]
            if any(value != 0.0 for value in others):
                problems.append(f"a standby's timerd_leader gauge is not 0: {others}")
        due = stream.stop()
        last_due_s = (max(due.values()) - now_ms()) / 1000
        if arrived_within(last_due_s + 20, set(due), receiver):  # else reported as lost
            wait_until(lambda: set(due) <= ids_in_state(db, State.FIRED), 15, "all to be fired")
        arrivals = list(receiver.arrivals)
    got = tally(due, arrivals)
    unexplained = got.duplicates - in_flight
    if got.lost:
        problems.append(f"{len(got.lost)} acknowledged timer(s) never arrived")
    if got.early:
        problems.append(f"{len(got.early)} arrived early (id, ms early): {got.early[:3]}")
    if unexplained:
        problems.append(f"{len(unexplained)} repeated although not in flight at a kill")
    slow = [ms for ms in lease_ms if ms > TAKEOVER_BOUND_MS]
    if slow:
        problems.append(f"takeovers slower than {TAKEOVER_BOUND_MS} ms: {slow}")
    report(
        Figures(
            test="leader kill -9 x10",
            timers=got.timers,
            faults=f"{CYCLES} x SIGKILL of the leader",
            lost=len(got.lost),
            duplicates=len(got.duplicates),
            early=len(got.early),
            takeover_ms=lease_ms,
            extra={
                "in_flight_at_kills": len(in_flight),
                "delivery_resumed_ms": spread(resumed_ms),
                "refused_creates": sum(stream.refused.values()),
            },
            problems=problems,
        )
    )
    assert not problems, "\n".join(problems)
    assert stream.refused.total() == 0, f"creates refused: {dict(stream.refused)}"


def leading(db: Path, daemons: list[TimerdProcess]) -> TimerdProcess:
    """The daemon that holds the lease now (waiting, bounded, until one does)."""
    pid = wait_until(lambda: leader_pid(db), 10, "a leader")
    [leader] = [d for d in daemons if d.pid == pid]
    return leader


def new_leader(db: Path, daemons: list[TimerdProcess]) -> TimerdProcess | None:
    pid = leader_pid(db)
    return next((d for d in daemons if d.pid == pid), None)


def acquired_ms(daemon: TimerdProcess) -> int:
    """When `daemon` logged taking the lease (each daemon here takes it at most once)."""
    [event] = wait_until(lambda: logged(daemon, "leader_acquired"), 5, "leader_acquired")
    at_ms: int = event["at_ms"]
    return at_ms


def first_arrival_after(receiver: Receiver, killed_ms: int, dying: set[str]) -> int | None:
    """When the first timer arrived after the kill that the dead leader had not claimed (bytes
    it sent just before dying may still reach the receiver after the kill)."""
    arrivals = list(receiver.arrivals)
    fresh = [a.at_ms for a in arrivals if a.at_ms >= killed_ms and a.timer_id not in dying]
    return min(fresh, default=None)
