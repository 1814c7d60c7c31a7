"""`timerd bench --shape fire-cpu`: where the CPU of a fire goes, measured part by part.

A burst's fires/s on a small machine moves with whatever else the machine runs; the CPU time one
part of a fire takes moves far less. This shape measures three parts in this process, each
--repeat times in turn (5 by default), as microseconds of CPU (all threads) per fire:

- `daemon`: a real `Daemon` with the settings of the environment over a temporary SQLite file
  fires --n timers (a URL each, one host, all due at once) through a stand-in deliverer that
  answers 200 at once: claims, outcome writes, polls, host slots, metrics and the logging at
  the run's level (into a file: at `info`, the default, a delivered attempt has no line of its
  own, at `debug` it has); everything but HTTP.
- `delivery`: --n POSTs, 32 at a time, to the bench's receiver (a child process) through timerd's
  `Deliverer`: body, headers, address checks and one aiohttp request.
- `bare_post`: the same POSTs through a bare `ClientSession.post`, as `ceiling.py` sends them.

A fire costs about `daemon + delivery`; the ceiling's costs about `bare_post`. The first two
run with the garbage collector set as timerd sets it (`timerd.garbage`), the third with Python's
defaults, as `ceiling.py` runs.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import uvloop

from timerd import garbage
from timerd.bench import BenchError, Options, Receiver, log_level
from timerd.clock import SystemClock
from timerd.daemon import Daemon
from timerd.delivery import Attempt, Deliverer
from timerd.logs import configure_logging
from timerd.models import Timer, new_claim_token, new_timer_id
from timerd.settings import build_settings
from timerd.store import open_store

DEFAULT_ROUNDS = 5
IN_FLIGHT = 32  # deliveries at once in the delivery parts: the default per-host limit
STAND_IN_LATENCY_MS = 0.5
PARTS = ("daemon", "delivery", "bare_post")


def run_fire_cpu(opts: Options) -> dict[str, Any]:
    """Measure each part `opts.repeat` times (DEFAULT_ROUNDS unless given), alternating."""
    rounds = DEFAULT_ROUNDS if opts.repeat is None else opts.repeat
    level, level_from = log_level(opts)
    runs: dict[str, list[float]] = {part: [] for part in PARTS}
    receiver = Receiver()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="timerd-fire-cpu-") as directory,
            (Path(directory) / "daemon.log").open("w") as log_file,
        ):
            _log_to(log_file, level)  # once: structlog's loggers keep the file they first had
            for round_number in range(rounds):
                work = Path(directory) / f"round-{round_number}"
                work.mkdir()
                runs["daemon"].append(uvloop.run(_daemon_cpu(opts.n, work)))
                runs["delivery"].append(uvloop.run(_delivery_cpu(opts.n, receiver.url)))
                runs["bare_post"].append(uvloop.run(_bare_post_cpu(opts.n, receiver.url)))
    finally:
        receiver.stop()
    return {
        "shape": opts.shape,
        "n": opts.n,
        "rounds": rounds,
        "log_level": level,
        "log_level_from": level_from,
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "us_per_fire": {part: _figures(values) for part, values in runs.items()},
    }


def fire_cpu_summary(result: dict[str, Any]) -> str:
    """The shape's summary lines."""
    figures = result["us_per_fire"]
    lines = [
        f"timerd bench fire-cpu n={result['n']}, {result['rounds']} rounds (the daemon logs at"
        f" {result['log_level']}, from {result['log_level_from']}): CPU microseconds per fire,"
        " least / median"
    ]
    lines += [
        f"  {part:9} {figures[part]['min']:7.1f} / {figures[part]['median']:7.1f}" for part in PARTS
    ]
    timerd = figures["daemon"]["median"] + figures["delivery"]["median"]
    lines.append(
        f"  a fire: daemon + delivery = {timerd:.1f}, {timerd / figures['bare_post']['median']:.2f}"
        " x a bare post (medians)"
    )
    return "\n".join(lines)


def _figures(values: list[float]) -> dict[str, Any]:
    rounded = [round(v, 1) for v in values]
    return {"min": min(rounded), "median": round(statistics.median(values), 1), "runs": rounded}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def _per_fire(n: int, work: Callable[[], Awaitable[None]], *, timerd: bool) -> float:
    """CPU microseconds per fire that `work` (which does n fires) takes; with the garbage
    collector set as a `timerd` process sets it once started (`garbage.serving`), or left at
    Python's defaults, as `ceiling.py` leaves it."""
    if timerd:
        garbage.serving()
    try:
        started = _cpu_s()
        await work()
        return (_cpu_s() - started) / n * 1_000_000
    finally:
        if timerd:
            garbage.defaults()


async def _daemon_cpu(n: int, directory: Path) -> float:
    settings = build_settings(None, os.environ)
    store = open_store(f"sqlite:///{directory / 'timers.db'}", for_daemon=True)
    clock = SystemClock()
    due_ms = clock.now_ms() + 1000  # read into the window first, as in a burst
    store.insert_many(
        [
            Timer(
                id=new_timer_id(),
                url=f"http://127.0.0.1:9/hooks/{i}",
                due_at_ms=due_ms,
                created_at_ms=due_ms - 1000,
            )
            for i in range(n)
        ]
    )
    delivered = 0
    all_delivered = asyncio.Event()

    async def stand_in(timer: Timer) -> Attempt:
        nonlocal delivered
        await asyncio.sleep(0)  # one turn of the loop, as a request's answer takes
        delivered += 1
        if delivered == n:
            all_delivered.set()
        return Attempt(clock.now_ms(), STAND_IN_LATENCY_MS, status=200)

    daemon = Daemon(settings, store, stand_in)
    running = asyncio.create_task(daemon.run())
    try:
        await asyncio.sleep(max(0.0, (due_ms - clock.now_ms()) / 1000))
        return await _per_fire(n, lambda: _within(all_delivered.wait(), n, "daemon"), timerd=True)
    finally:
        daemon.stop()
        await running
        store.close()


def _log_to(log_file: TextIO, level: str) -> None:
    """The daemon's logging set-up (JSON lines at `level`), into `log_file`."""
    stderr, sys.stderr = sys.stderr, log_file
    try:
        configure_logging(level, "json")
    finally:
        sys.stderr = stderr


async def _delivery_cpu(n: int, url: str) -> float:
    settings = build_settings(None, os.environ | {"TIMERD_ALLOWED_NETWORKS": "127.0.0.0/8"})
    now_ms = SystemClock().now_ms()
    timers = [
        Timer(
            id=new_timer_id(),
            url=f"{url}/{i}",
            due_at_ms=now_ms,
            created_at_ms=now_ms,
            attempts=1,
            claim_token=new_claim_token(),
        )
        for i in range(n)
    ]
    slots = asyncio.Semaphore(IN_FLIGHT)
    async with Deliverer(settings) as deliverer:

        async def one(timer: Timer) -> None:
            async with slots:
                attempt = await deliverer.deliver(timer)
            if not attempt.delivered:
                raise BenchError(f"a delivery to the receiver failed: {attempt}")

        async def all_of_them() -> None:
            await asyncio.gather(*(one(t) for t in timers))

        return await _per_fire(n, lambda: _within(all_of_them(), n, "delivery"), timerd=True)


async def _bare_post_cpu(n: int, url: str) -> float:
    ids = [new_timer_id() for _ in range(n)]
    slots = asyncio.Semaphore(IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(timer_id: str) -> None:
            async with slots, session.post(f"{url}/{timer_id}", json={"id": timer_id}) as r:
                await r.read()

        async def all_of_them() -> None:
            await asyncio.gather(*(one(i) for i in ids))

        return await _per_fire(n, lambda: _within(all_of_them(), n, "bare_post"), timerd=False)


async def _within(work: Awaitable[Any], n: int, part: str) -> None:
    """`work`, or a BenchError when it takes far longer than any machine needs."""
    try:
        await asyncio.wait_for(work, timeout=30 + n / 500)
    except TimeoutError:
        raise BenchError(f"the {part} part did not finish {n} fires in time") from None
