"""Run one seed from start to verdict."""

from __future__ import annotations

import asyncio
import gc
import random
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tests.sim.faults import mongomock_bulk_without_sort
from tests.sim.loop import Deadlock, RunawayLoop, VirtualLoop
from tests.sim.trace import capture_logs
from tests.sim.world import SimConfig, World


@dataclass(slots=True)
class SimResult:
    """The verdict of one seed, with enough to judge and replay it."""

    config: SimConfig
    violations: list[str]
    digest: str
    trace: list[str]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        """The failure as printed: seed, replay command, violations, the trace's tail."""
        lines = [
            f"seed {self.config.seed} ({self.config.store}) FAILED: {len(self.violations)}"
            f" violation(s)",
            f"  replay: {self.config.replay}",
        ]
        lines += [f"  - {v}" for v in self.violations[:20]]
        return "\n".join(lines)


def run_seed(config: SimConfig) -> SimResult:
    """Simulate one seed; never raises for what the simulated world does."""
    started = time.perf_counter()
    saved_random = random.getstate()
    random.seed(config.seed)  # timerd's own jitter (retry and backoff) draws from `random`
    loop = VirtualLoop()
    with (
        tempfile.TemporaryDirectory(prefix="timerd-sim-") as workdir,
        mongomock_bulk_without_sort(),
    ):
        world = World(config, loop, Path(workdir))
        with capture_logs(world.trace):
            try:
                loop.run_until_complete(world.main())
            except (Deadlock, RunawayLoop) as exc:
                world.violate(f"the world stopped: {exc!r}")
            except Exception as exc:  # a bug of the simulator itself, or an unexpected raise
                world.trace(traceback.format_exc())
                world.violate(f"simulation raised {exc!r}")
            finally:
                _shut(loop, world)
    random.setstate(saved_random)
    stats = _stats(world, loop, time.perf_counter() - started)
    return SimResult(config, world.violations, world.trace.digest, list(world.trace.lines), stats)


def run_for_report(config: SimConfig) -> SimResult:
    """`run_seed` for a pool worker: only a failure (or a verbose run) carries its trace home."""
    try:
        result = run_seed(config)
    except Exception as exc:  # the simulator cannot run this seed: report it, keep the pool
        return SimResult(config, [f"the simulator failed: {exc!r}"], "", [traceback.format_exc()])
    if result.ok and not config.verbose:
        result.trace = []
    return result


def _shut(loop: VirtualLoop, world: World) -> None:
    """Cancel whatever is left, report exceptions nobody retrieved, and close everything."""
    killed = {a.name for a in world.actors if a.view.dead}
    leftovers = [t for t in loop.live_tasks("sim")] + [
        t for a in world.actors for t in loop.live_tasks(a.name)
    ]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(_settle(leftovers))
    gc.collect()
    unhandled = [u for u in loop.unhandled if not any(f"{k}@" in u for k in killed)]
    for what in unhandled:
        world.violate(f"unhandled in the event loop: {what}")
    loop.close()
    world.close()


async def _settle(tasks: list[object]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]


def _stats(world: World, loop: VirtualLoop, wall_s: float) -> dict[str, float]:
    api = world.api
    return {
        "virtual_s": loop.time(),
        "wall_s": wall_s,
        "timers": len(api.log.acked) if api else 0,
        "deliveries": len(world.ledger.deliveries),
        "kills": sum(d.kind == "kill" for d in world.disruptions),
        "stalls": sum(d.kind.startswith("stall") for d in world.disruptions),
        "daemons": len(world.actors),
        "iterations": loop.iterations,
        "inline_executor_calls": loop.inline_executor_calls,
    }
