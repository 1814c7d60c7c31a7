"""The deployed shape under load, with real processes on one SQLite file: a real nginx in front
of three `timerd api` replicas and two `timerd daemon`s, 1,000 timers, the leader killed halfway;
and a leader stopped with SIGTERM while it fires 1,000 timers, with a standby ready."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.support.cluster import (
    POLL_S,
    ids_in,
    ids_in_state,
    leader_pid,
    now_ms,
    rfc3339,
    start_daemon,
    store_url,
)
from tests.support.nginx import NGINX_MISSING, UPSTREAM_HEADER, Nginx, nginx_binary
from tests.support.procs import HOST, TimerdProcess, TimerdProcesses
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until
from timerd.models import State

N_TIMERS = 1000
CREATE_CONCURRENCY = 32
LEAD_S = 2.5  # from the first create to the first due time; creating 1,000 takes < 1 s
SPREAD_S = 3.0  # due times are spread evenly over this long
SLOW_TTL_S = 6.0  # the graceful test's lease: an expired one would be taken over too late
DELIVERY_DELAY_S = 0.02  # the receiver's answer time, so deliveries are in flight at any moment

needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason=NGINX_MISSING)


def spread_dues() -> list[int]:
    """`N_TIMERS` due times spread evenly over `SPREAD_S`, the first `LEAD_S` from now."""
    first_ms = now_ms() + int(LEAD_S * 1000)
    return [first_ms + int(SPREAD_S * 1000 * i / N_TIMERS) for i in range(N_TIMERS)]


def create_all(base_url: str, url: str, dues_ms: list[int]) -> tuple[dict[str, int], Counter[str]]:
    """Create one timer per due time through `base_url`, `CREATE_CONCURRENCY` at a time; return
    {id: due} and how many creates each upstream served (by the `X-Upstream` answer header).
    aiohttp, because httpx's client alone would take seconds of this machine's CPU for 1,000."""

    async def create(session: aiohttp.ClientSession, due_ms: int) -> tuple[int, str, str]:
        body = {"url": url, "fire_at": rfc3339(due_ms)}
        async with session.post("/timers", json=body) as answer:
            return answer.status, await answer.text(), answer.headers.get(UPSTREAM_HEADER, "")

    async def create_every() -> list[tuple[int, str, str]]:
        connector = aiohttp.TCPConnector(limit=CREATE_CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
            return await asyncio.gather(*(create(session, due) for due in dues_ms))

    answers = asyncio.run(create_every())
    refused = [f"{status} {text}" for status, text, _ in answers if status != 201]
    assert not refused, f"{len(refused)} create(s) refused, first: {refused[:3]}"
    # After a retry on another replica nginx lists every upstream it tried; the last answered.
    served = Counter(upstream.split(", ")[-1] for _, _, upstream in answers)
    ids = [json.loads(text)["id"] for _, text, _ in answers]
    return dict(zip(ids, dues_ms, strict=True)), served


def wait_all_delivered(receiver: Receiver, db: Path, due: dict[str, int]) -> list[Arrival]:
    """Wait until every timer arrived and the store has them all `fired` (so no delivery can
    still follow); return every arrival."""
    ids = set(due)
    wait_until(lambda: ids <= set(ids_in(receiver.arrivals)), 30, "every timer to arrive")
    wait_until(lambda: ids <= ids_in_state(db, State.FIRED), 10, "all to be fired")
    return list(receiver.arrivals)


def leading(db: Path, daemons: list[TimerdProcess]) -> tuple[TimerdProcess, TimerdProcess]:
    """(the daemon that leads now, the other one)."""
    pid = leader_pid(db)
    [leader] = [d for d in daemons if d.pid == pid]
    [standby] = [d for d in daemons if d is not leader]
    return leader, standby


def assert_never_early(arrivals: list[Arrival], due: dict[str, int]) -> None:
    early = [(a.timer_id, a.at_ms - due[a.timer_id]) for a in arrivals if a.at_ms < due[a.timer_id]]
    assert not early, f"{len(early)} webhook(s) before their due time (id, ms): {early[:5]}"
    assert all(a.headers["webhook-id"] == a.timer_id for a in arrivals)


@needs_nginx
def test_behind_nginx_three_replicas_two_daemons_survive_a_killed_leader(
    procs: TimerdProcesses, db: Path, tmp_path: Path
) -> None:
    apis = [procs.start("api", store_url(db), ready=False) for _ in range(3)]
    for api in apis:
        api.wait_ready()
    daemons = [start_daemon(procs, db), start_daemon(procs, db, lead=False)]
    replicas = {f"{HOST}:{api.port}" for api in apis}
    with Nginx(tmp_path, sorted(replicas)) as lb, Receiver(delay_s=DELIVERY_DELAY_S) as receiver:
        due, served = create_all(lb.base_url, receiver.url, spread_dues())
        receiver.wait_for(N_TIMERS // 2, timeout_s=LEAD_S + SPREAD_S + 10)
        leader, standby = leading(db, daemons)
        leader.kill()
        # The dead leader writes nothing more and the standby waits for its lease to expire,
        # so this is exactly what was claimed and not yet recorded as delivered.
        in_flight = ids_in_state(db, State.FIRING)
        left = set(due) - set(ids_in(receiver.arrivals))
        arrivals = wait_all_delivered(receiver, db, due)
    assert left, "the leader delivered everything before the kill: nothing was taken over"
    counts = ids_in(arrivals)
    repeated = {i for i, n in counts.items() if n > 1}
    assert set(counts) == set(due)
    assert repeated <= in_flight, f"repeated although not in flight: {repeated - in_flight}"
    assert_never_early(arrivals, due)
    assert set(served) == replicas, f"creates per upstream: {dict(served)}"
    assert min(served.values()) >= N_TIMERS // 5, f"unbalanced: {dict(served)}"
    assert leader_pid(db) == standby.pid


def test_sigterm_to_a_busy_leader_loses_and_repeats_nothing_and_the_standby_carries_on(
    procs: TimerdProcesses, db: Path
) -> None:
    api = procs.start("api", store_url(db))
    # A lease long enough that only its release, not its expiry, explains a takeover in time.
    slow = {"TIMERD_LEASE_TTL_S": str(SLOW_TTL_S)}
    daemons = [start_daemon(procs, db, **slow), start_daemon(procs, db, lead=False, **slow)]
    with Receiver(delay_s=DELIVERY_DELAY_S) as receiver:
        due, _ = create_all(api.base_url, receiver.url, spread_dues())
        receiver.wait_for(N_TIMERS // 2, timeout_s=LEAD_S + SPREAD_S + 10)
        leader, standby = leading(db, daemons)
        exit_code = leader.stop()
        stopped_ms = now_ms()
        left = set(due) - set(ids_in(receiver.arrivals))
        arrivals = wait_all_delivered(receiver, db, due)
    assert exit_code == 0, leader.describe("exited with an error")
    assert left, "the leader delivered everything before it stopped: nothing was taken over"
    twice = sorted(i for i, n in ids_in(arrivals).items() if n > 1)
    assert not twice, f"{len(twice)} timer(s) delivered twice, first: {twice[:5]}"
    assert_never_early(arrivals, due)
    assert leader_pid(db) == standby.pid
    # The standby's first delivery: as soon as it holds the lease, or when the next is due.
    first_after = min(a.at_ms for a in arrivals if a.at_ms > stopped_ms)
    takeover_ms = first_after - max(stopped_ms, min(due[i] for i in left))
    assert takeover_ms <= (POLL_S + 1.0) * 1000, f"standby took {takeover_ms} ms to carry on"
    assert '"leader_released"' in leader.stderr()
