"""Partitioned firing: daemons share the partitions evenly, rebalance when one joins, leaves or
dies, and never fire one timer twice between them. The keepers run against every store (the
contract backends); the bursts run with real processes on SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from tests.support.offload import inline
from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from tests.test_daemon import FakeClock
from timerd import workers
from timerd.clock import StoreClock
from timerd.errors import StoreUnavailable
from timerd.lease import PartitionKeeper, owners
from timerd.models import PARTITIONS, partition_of
from timerd.settings import Settings
from timerd.store.base import Store
from timerd.workers import worker_count

TTL_S = 10.0
T = TypeVar("T")


def keeper(store: Store, clock: FakeClock, holder: str) -> PartitionKeeper:
    store_clock = StoreClock(clock, 60_000)
    store_clock.observe(clock.now_ms(), None, clock.now_ms())
    return PartitionKeeper(store, store_clock, holder, ttl_s=TTL_S, renew_s=3.0, offload=inline)


async def settle(keepers: list[PartitionKeeper], ticks: int = 3) -> None:
    for _ in range(ticks):
        for k in keepers:
            await k.tick()


def shares(keepers: list[PartitionKeeper]) -> list[set[int]]:
    return [set(k.held()) for k in keepers]


def assert_disjoint_and_complete(held: list[set[int]]) -> None:
    assert sum(len(h) for h in held) == PARTITIONS
    assert set().union(*held) == set(range(PARTITIONS))


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 7, 64, 65])
def test_the_partitions_are_shared_within_one_of_each_other(members: int) -> None:
    names = [f"host:{i}:x" for i in range(members)]
    shares = Counter(owners(PARTITIONS, names))
    counts = [shares[name] for name in names]
    assert sum(counts) == PARTITIONS
    assert max(counts) - min(counts) <= 1


def test_a_join_moves_few_partitions() -> None:
    three = ["a", "b", "c"]
    before, after = owners(PARTITIONS, three), owners(PARTITIONS, [*three, "d"])
    moved = sum(b != a for b, a in zip(before, after, strict=True))
    assert after.count("d") == PARTITIONS // 4
    assert moved <= PARTITIONS // 4 + PARTITIONS // 8  # the newcomer's share, and a little more


def test_keepers_share_join_leave_and_survive_a_death(store: Store) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        a, b = keeper(store, clock, "a"), keeper(store, clock, "b")
        await a.tick()
        assert a.held() == list(range(PARTITIONS))  # alone, it holds them all
        await settle([a, b])
        assert_disjoint_and_complete(shares([a, b]))
        assert [len(h) for h in shares([a, b])] == [PARTITIONS // 2] * 2

        c = keeper(store, clock, "c")  # joins
        await settle([a, b, c])
        assert_disjoint_and_complete(shares([a, b, c]))
        assert all(shares([a, b, c]))

        await b.release()  # leaves cleanly: handed over at the next ticks
        await settle([a, c])
        assert_disjoint_and_complete(shares([a, c]))

        clock.advance(int(TTL_S * 1000) + 1)  # c dies: a takes its share once it expires
        await settle([a])
        assert a.held() == list(range(PARTITIONS))

    asyncio.run(scenario())


def test_taking_many_partitions_from_a_slow_store_never_lets_the_held_ones_expire(
    store: Store,
) -> None:
    clock = FakeClock()
    call_ms = [0]  # how long each store call takes, on the fake clock

    async def slow(call: Callable[[], T]) -> T:
        clock.advance(call_ms[0])
        return call()

    def live_holders() -> dict[str, str]:
        return {
            lease.name: lease.holder
            for lease in store.leases()
            if lease.expires_at_ms >= clock.now_ms() and lease.name.startswith("p")
        }

    async def scenario() -> None:
        store_clock = StoreClock(clock, 60_000)
        store_clock.observe(clock.now_ms(), None, clock.now_ms())
        a = PartitionKeeper(store, store_clock, "a", ttl_s=TTL_S, renew_s=3.0, offload=slow)
        b = keeper(store, clock, "b")
        await settle([a, b])
        kept = set(a.held())
        assert len(kept) == PARTITIONS // 2
        await b.release()
        call_ms[0] = 1000  # the takes alone last three TTLs and more
        await a.tick()
        assert a.held() == list(range(PARTITIONS))
        assert live_holders() == {f"p{p}": "a" for p in range(PARTITIONS)}

    asyncio.run(scenario())


class AnswersLost:
    """A store whose next call to each named method fails with the store unavailable: before
    it reaches the store, or (`applied`) after the store carried it out, as when a connection
    drops on the way back."""

    def __init__(self, store: Store, failing: set[str], *, applied: bool) -> None:
        self._store, self._failing, self._applied = store, failing, applied

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._store, name)
        if name not in self._failing:
            return call

        def fail(*args: Any) -> Any:
            self._failing.discard(name)
            if self._applied:
                call(*args)
            raise StoreUnavailable(f"{name}: connection lost (simulated)")

        return fail


def live_partitions(store: Store, clock: FakeClock, holder: str) -> set[str]:
    now_ms = clock.now_ms()
    return {
        lease.name
        for lease in store.leases()
        if lease.holder == holder and lease.expires_at_ms >= now_ms and lease.name.startswith("p")
    }


@pytest.mark.parametrize("applied", [False, True], ids=["refused", "applied"])
def test_a_hand_over_whose_release_fails_is_released_at_the_next_tick(
    store: Store, applied: bool
) -> None:
    clock = FakeClock()
    flaky = AnswersLost(store, set(), applied=applied)

    async def scenario() -> None:
        a, b = keeper(cast(Store, flaky), clock, "a"), keeper(store, clock, "b")
        await settle([a, b], ticks=1)  # a holds them all; b is a member and waits
        flaky._failing.add("release_lease")
        await a.tick()  # its first hand-over fails
        await settle([a, b])  # no time passes: nothing may wait for a lease to expire
        assert_disjoint_and_complete(shares([a, b]))

    asyncio.run(scenario())


def test_a_hand_over_releases_each_partition_once(store: Store) -> None:
    clock = FakeClock()
    released: list[str] = []

    class Counting(AnswersLost):
        def release_lease(self, name: str, holder: str, epoch: int) -> bool:
            released.append(name)
            return store.release_lease(name, holder, epoch)

    async def scenario() -> None:
        a = keeper(cast(Store, Counting(store, set(), applied=False)), clock, "a")
        b = keeper(store, clock, "b")
        await settle([a, b], ticks=1)  # a holds them all; b is a member and waits
        await a.tick()
        await a.tick()
        assert sorted(released) == sorted(f"p{p}" for p in range(PARTITIONS) if not a.holds(p))
        assert len(released) == PARTITIONS // 2

    asyncio.run(scenario())


def test_a_take_whose_answer_was_lost_is_released_at_a_clean_stop(store: Store) -> None:
    clock = FakeClock()
    flaky = AnswersLost(store, set(), applied=True)

    async def scenario() -> None:
        a, b = keeper(cast(Store, flaky), clock, "a"), keeper(store, clock, "b")
        await settle([a, b])
        await b.release()
        flaky._failing.add("acquire_lease")
        await a.tick()  # takes the first of b's partitions, but never hears that it did
        assert len(live_partitions(store, clock, "a")) == len(a.held()) + 1
        await a.release()
        assert live_partitions(store, clock, "a") == set()
        assert not [lease for lease in store.leases() if lease.expires_at_ms >= clock.now_ms()]

    asyncio.run(scenario())


# real processes

FAST = {
    "TIMERD_LEASE_TTL_S": "2",
    "TIMERD_LEASE_RENEW_S": "0.5",
    "TIMERD_POLL_INTERVAL_S": "0.2",
}


def held_by(db: Path) -> dict[str, int]:
    """Live partition leases per holder, read from the SQLite file."""
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT holder, count(*) FROM leases WHERE name LIKE 'p%' AND expires_at_ms > ?"
            " GROUP BY holder",
            (time.time_ns() // 1_000_000,),
        ).fetchall()
    return dict(rows)


def balanced(db: Path, daemons: int) -> Callable[[], bool]:
    """Whether `daemons` daemons hold every partition between them."""

    def check() -> bool:
        held = held_by(db)
        return len(held) == daemons and sum(held.values()) == PARTITIONS

    return check


def pid_of(holder: str) -> int:
    return int(holder.split(":")[1])


def create_burst(api: TimerdProcess, url: str, n: int, due_ms: int) -> list[str]:
    fire_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(due_ms / 1000))
    fire_at += f".{due_ms % 1000:03d}Z"
    ids = []
    with httpx.Client(base_url=api.base_url) as client:
        for i in range(n):
            answer = client.post("/timers", json={"url": f"{url}/o{i}", "fire_at": fire_at})
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
    return ids


def unique(receiver: Receiver) -> int:
    return len({a.timer_id for a in list(receiver.arrivals)})


def firers(db: Path, ids: list[str]) -> Counter[str]:
    with closing(sqlite3.connect(db)) as conn:
        marks = ", ".join("?" * len(ids))
        rows = conn.execute(f"SELECT fired_by FROM timers WHERE id IN ({marks})", ids)
        return Counter(row[0] for row in rows)


def test_three_daemons_a_join_and_a_kill_mid_burst_lose_and_double_nothing(
    procs: TimerdProcesses, db: Path
) -> None:
    url = f"sqlite:///{db}"
    api = procs.start("api", url)
    first = [procs.start("daemon", url, env=FAST) for _ in range(2)]
    wait_until(balanced(db, 2), 10, "two daemons to share the partitions")
    with Receiver(delay_s=0.05) as receiver:
        due_ms = time.time_ns() // 1_000_000 + 3_000
        ids = create_burst(api, receiver.url, 600, due_ms)
        assert time.time_ns() // 1_000_000 < due_ms, "creating the burst took too long"
        wait_until(lambda: unique(receiver) >= 100, 15, "the burst to start")
        procs.start("daemon", url, env=FAST)  # joins mid-burst
        victim = first[0]
        victim.kill()  # and one dies mid-burst
        wait_until(lambda: unique(receiver) >= len(ids), 30, "every timer of the burst")
        arrivals = list(receiver.arrivals)
    delivered = Counter(a.timer_id for a in arrivals)
    assert set(delivered) == set(ids), "lost"
    assert min(a.at_ms for a in arrivals) >= due_ms, "early"
    doubled = [i for i, n in delivered.items() if n > 1]
    # only what the killed daemon had in flight may come twice: at most its concurrency
    assert len(doubled) <= 256
    fired = firers(db, ids)
    assert len(fired) >= 2, f"one daemon fired everything: {fired}"


def test_a_joining_daemon_takes_its_share_and_a_stopping_one_hands_over_at_once(
    procs: TimerdProcesses, db: Path
) -> None:
    url = f"sqlite:///{db}"
    alone = procs.start("daemon", url, env=FAST)
    wait_until(balanced(db, 1), 10, "one daemon to hold every partition")
    joined_at = time.monotonic()
    joiner = procs.start("daemon", url, env=FAST)
    wait_until(balanced(db, 2), 10, "the joiner to take its share")
    assert time.monotonic() - joined_at < 5.0
    assert sorted(held_by(db).values()) == [PARTITIONS // 2] * 2

    stopped_at = time.monotonic()
    assert joiner.stop() == 0
    wait_until(balanced(db, 1), 10, "the remaining daemon to hold every partition")
    assert time.monotonic() - stopped_at < 3.0  # handed over, not waited out (TTL 2 s + poll)
    assert pid_of(next(iter(held_by(db)))) == alone.pid


def test_one_command_runs_several_firing_processes(procs: TimerdProcesses, db: Path) -> None:
    url = f"sqlite:///{db}"
    parent = procs.start("daemon", url, env=FAST | {"TIMERD_WORKERS": "2"})
    wait_until(balanced(db, 2), 10, "both workers to share every partition")
    pids = {pid_of(holder) for holder in held_by(db)}
    assert parent.pid not in pids  # the parent supervises; its children fire
    ports = [
        json.loads(line)["port"]
        for line in parent.stderr().splitlines()
        if '"metrics_listening"' in line
    ]
    assert len(set(ports)) == 2
    assert parent.stop() == 0
    wait_until(lambda: not held_by(db), 5, "the workers to hand every partition back")


def test_two_daemons_on_one_host_with_default_metrics_ports_both_run(
    procs: TimerdProcesses, db: Path
) -> None:
    url = f"sqlite:///{db}"
    first = procs.start("daemon", url, env=FAST)
    same_port = ["--metrics-port", str(first.port)]  # as two daemons started with defaults
    second = procs.start("daemon", url, args=same_port, env=FAST, ready=False)
    wait_until(balanced(db, 2), 10, "both daemons to share every partition")
    assert second.running()
    listening = [json.loads(x) for x in second.stderr().splitlines() if "metrics_listening" in x]
    assert len(listening) == 1 and listening[0]["port"] > first.port
    health = httpx.get(f"http://127.0.0.1:{listening[0]['port']}/healthz")
    assert health.status_code == 200


def test_partition_of_is_stable_and_in_range() -> None:
    assert partition_of("6b0c912909a000c549ae2f99", PARTITIONS) == 0xAE2F99 % PARTITIONS
    assert all(0 <= partition_of(f"{i:024x}", PARTITIONS) < PARTITIONS for i in range(1000))


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (8, 8), (64, 64), (96, 64)])
def test_the_daemon_runs_one_process_per_core_but_no_more_than_partitions(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    monkeypatch.setattr(workers, "available_cpus", lambda: cores)
    assert worker_count(Settings()) == expected
    assert worker_count(Settings(workers=5)) == 5  # TIMERD_WORKERS wins


@pytest.mark.parametrize(
    ("service_max", "slice_max", "expected"),
    [
        ("max 100000", None, 8),
        ("200000 100000", None, 2),
        ("150000 100000", None, 2),
        ("50000 100000", None, 1),
        (None, None, 8),
        ("max 100000", "300000 100000", 3),  # a quota on a parent (a systemd slice) counts too
    ],
)
def test_the_cores_a_daemon_may_use_are_its_affinity_within_its_cgroups_quotas(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    service_max: str | None,
    slice_max: str | None,
    expected: int,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    own = tmp_path / "self-cgroup"
    own.write_text("1:cpu:/\n0::/system.slice/timerd-daemon.service\n")
    service = tmp_path / "root" / "system.slice" / "timerd-daemon.service"
    service.mkdir(parents=True)
    for group, cpu_max in ((service, service_max), (service.parent, slice_max)):
        if cpu_max is not None:
            (group / "cpu.max").write_text(cpu_max + "\n")
    assert workers.available_cpus(tmp_path / "root", own) == expected
