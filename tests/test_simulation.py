"""The deterministic simulator (tests/sim): seeds over both stores, exact replays, and the
pieces it stands on (virtual time, the fault wrapper, the error translators).

`python -m tests.sim --seeds 100000` runs any number of seeds on every core; a failure prints
the command that replays it (`python -m tests.sim --seed 1234 --store sqlite -v`).
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from tests.sim.__main__ import kind_of as _kind
from tests.sim.faults import DriverErrors, FaultPlan, FaultyStore, translator
from tests.sim.loop import Deadlock, VirtualLoop
from tests.sim.run import SimResult, run_for_report, run_seed
from tests.sim.world import SimConfig
from timerd.errors import StoreUnavailable
from timerd.store.base import Store

STORES = ("sqlite", "mongo")
# mongomock costs about three times what SQLite does per seed; TIMERD_SIM_SEEDS scales both.
SCALE = float(os.environ.get("TIMERD_SIM_SEEDS", "1"))
SEEDS = {"sqlite": int(200 * SCALE), "mongo": int(80 * SCALE)}

# Seeds that found a defect in timerd (with the simulator as of this list: a change to the
# simulator changes what a seed does). Each must pass once its defect is fixed, and stay so.
# (seed, store, what broke)
REGRESSION_SEEDS: list[tuple[int, str, str]] = [
    (1, "sqlite", "Retry-After '²' (isdigit, but not float) crashed the daemon (d411f39)"),
    (1, "mongo", "Retry-After '²' (isdigit, but not float) crashed the daemon (d411f39)"),
    (0, "sqlite", "attempts and fired_at_ms stamped with the host's skewed clock (d411f39)"),
    (209, "sqlite", "an HTTP-date Retry-After judged by the host's skewed clock (d411f39)"),
    (7, "sqlite", "fired up to half a clock reading's round trip early: offset error"),
    (7, "mongo", "fired up to half a clock reading's round trip early: offset error"),
    (40289, "sqlite", "a hand-over whose release failed kept its lease live after a clean stop"),
    (40289, "mongo", "a hand-over whose release failed kept its lease live after a clean stop"),
]


def _failures(results: list[SimResult]) -> str:
    failed = [r for r in results if not r.ok]
    kinds = Counter(_kind(v) for r in failed for v in set(r.violations))
    lines = [f"{len(failed)} of {len(results)} seeds failed:"]
    lines += [f"  {n:4d}  {kind}" for kind, n in kinds.most_common(10)]
    lines += [r.report() for r in failed[:8]]
    return "\n".join(lines)


@pytest.mark.parametrize("store", STORES)
def test_seeds(store: str) -> None:
    """Every seed of the default range holds every invariant (run on all cores)."""
    configs = [SimConfig(seed, store) for seed in range(SEEDS[store])]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(run_for_report, configs, chunksize=8)
    assert all(r.ok for r in results), _failures(results)


@pytest.mark.parametrize(("seed", "store", "defect"), REGRESSION_SEEDS)
def test_regression_seed(seed: int, store: str, defect: str) -> None:
    result = run_seed(SimConfig(seed, store))
    assert result.ok, f"{defect}\n{result.report()}"


@pytest.mark.parametrize("store", STORES)
def test_a_seed_replays_exactly(store: str) -> None:
    first, second = (run_seed(SimConfig(7, store)) for _ in range(2))
    assert first.digest == second.digest
    assert first.violations == second.violations
    assert first.stats["deliveries"] == second.stats["deliveries"] > 0


def test_the_command_line_replays_one_seed() -> None:
    command = [sys.executable, "-m", "tests.sim", "--seed", "3", "--store", "sqlite", "--jobs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert "1 runs (sqlite)" in done.stdout, done.stdout + done.stderr


# the pieces


def test_virtual_time_jumps_to_the_next_timer() -> None:
    loop = VirtualLoop()

    async def sleepy() -> float:
        await asyncio.sleep(3600)
        await asyncio.wait_for(asyncio.sleep(1), 10)
        return loop.time()

    try:
        assert loop.run_until_complete(sleepy()) == pytest.approx(3601)
    finally:
        loop.close()


def test_a_world_where_nothing_can_happen_is_a_deadlock() -> None:
    loop = VirtualLoop()
    try:
        with pytest.raises(Deadlock):
            loop.run_until_complete(asyncio.Event().wait())
    finally:
        loop.close()


def test_the_fault_wrapper_delegates_every_store_method() -> None:
    abstract = {name for name, _ in inspect.getmembers(Store) if name in Store.__abstractmethods__}
    assert not FaultyStore.__abstractmethods__
    assert abstract <= set(vars(FaultyStore))


@pytest.mark.parametrize("kind", STORES)
def test_every_injected_driver_error_translates_to_store_unavailable(kind: str) -> None:
    errors = DriverErrors.of(kind)
    for make in (*errors.retryable, errors.dead):
        with pytest.raises(StoreUnavailable), translator(kind)():
            raise make()


def test_faults_stop_when_the_plan_is_off(tmp_path: object) -> None:
    from timerd.store.sqlite import SqliteStore  # noqa: PLC0415 - only this test opens one

    inner = SqliteStore(str(tmp_path) + "/faults.db", synchronous="OFF")
    plan = FaultPlan(p_before=1.0)
    view = FaultyStore(
        inner,
        name="t",
        kind="sqlite",
        rng=random.Random(1),
        plan=plan,
        server_time_ms=lambda: 42,
        trace=lambda _: None,
    )
    try:
        with pytest.raises(StoreUnavailable):
            view.ping()
        plan.on = False
        view.ping()
        assert view.server_time_ms() == 42
    finally:
        inner.close()
