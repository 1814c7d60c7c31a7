"""`timerd bench --shape create`: how fast one `timerd api` process creates timers, next to the
floor (`timerd.bench_floor`: a bare Starlette endpoint on the same server settings) measured in
the same run with the same clients and bodies, and how many timers a second it stores through
`POST /timers/batch`.

Every timer has a URL of its own (`…/hooks/<n>`, --same-url for one) and an absolute `fire_at` a
day ahead; no daemon runs, so nothing fires. The API's store is a temporary SQLite file with the
default, durable settings (`synchronous=FULL`, group commit) unless --store says otherwise.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from timerd.bench import (
    BACKLOG_DUE_AFTER_MS,
    REQUEST_TIMEOUT,
    Child,
    Lab,
    Options,
    cpu_s,
    fire_at,
    for_each,
    free_port,
    healthz_ok,
    now_ms,
    run_header,
    state_counts,
    wait_until,
)

WARMUP = 500  # creates before each measured run, not counted
BATCH_SIZE = 1000  # timers per POST /timers/batch: the most one may hold
BATCH_CLIENTS = 2  # concurrent batch requests
PHASE_TIMEOUT_S = 120.0  # no request of a phase starts after this
HOOK_URL = "http://127.0.0.1:9/hooks"  # never called: no daemon runs


@dataclass(frozen=True, slots=True)
class Phase:
    """What one measured phase did: requests answered as hoped, errors by kind, wall time, and
    the CPU seconds the server process used meanwhile."""

    ok: int
    errors: dict[str, int]
    elapsed_s: float
    cpu_s: float

    def figures(self, unit: str) -> dict[str, Any]:
        return {
            f"{unit}_per_s": round(self.ok / max(self.elapsed_s, 1e-9)),
            f"cpu_ms_per_{unit[:-1]}": round(1000 * self.cpu_s / max(self.ok, 1), 3),
            "errors": self.errors,
        }


def create_bodies(n: int, prefix: str, same_url: bool) -> list[dict[str, Any]]:
    """`n` create bodies due a day from now, each with a URL of its own unless `same_url`."""
    due = fire_at(now_ms() + BACKLOG_DUE_AFTER_MS)
    return [
        {"url": HOOK_URL if same_url else f"{HOOK_URL}/{prefix}{i}", "fire_at": due}
        for i in range(n)
    ]


async def post_each(port: int, bodies: Sequence[Any], path: str, clients: int) -> Phase:
    """POST each body to `path` from `clients` keep-alive connections; count the answers that
    created what they were sent (201 for a create, every item 201 for a batch)."""
    errors: Counter[str] = Counter()
    ok = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:

        async def post(body: Any) -> None:
            nonlocal ok
            try:
                async with session.post(f"http://127.0.0.1:{port}{path}", json=body) as answer:
                    data = await answer.json()
                    if isinstance(body, dict):
                        ok += answer.status == 201
                        errors.update([] if answer.status == 201 else [f"http {answer.status}"])
                    else:
                        statuses = Counter(r["status"] for r in data["results"])
                        ok += statuses.pop(201, 0)
                        errors.update({f"item {s}": c for s, c in statuses.items()})
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                errors[type(exc).__name__] += 1

        started = time.monotonic()
        await for_each(bodies, clients, started + PHASE_TIMEOUT_S, post)
        elapsed = time.monotonic() - started
    return Phase(ok, dict(errors), elapsed, 0.0)


def measured(pid: int, port: int, bodies: Sequence[Any], path: str, clients: int) -> Phase:
    """`post_each`, with the CPU seconds process `pid` used meanwhile."""
    before = cpu_s(pid)
    phase = asyncio.run(post_each(port, bodies, path, clients))
    return Phase(phase.ok, phase.errors, phase.elapsed_s, cpu_s(pid) - before)


def start_floor(lab: Lab) -> tuple[int, Child]:
    """Start `python -m timerd.bench_floor` as one of the lab's children."""
    port = free_port()
    log_path = lab.dir / "floor.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603 -- this interpreter, our own module
            [sys.executable, "-m", "timerd.bench_floor", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    child = lab.children["floor"] = Child("floor", proc, log_path)
    wait_until(lambda: healthz_ok(port), child, "the floor's /healthz")
    return port, child


def creates(pid: int, port: int, opts: Options, prefix: str) -> Phase:
    """Warm up, then measure N single creates from --clients clients."""
    measured(pid, port, create_bodies(WARMUP, f"w{prefix}", opts.same_url), "/timers", 8)
    bodies = create_bodies(opts.n, prefix, opts.same_url)
    return measured(pid, port, bodies, "/timers", opts.clients)


def batches(pid: int, port: int, opts: Options) -> Phase:
    """N timers (at least one batch) through `POST /timers/batch`, BATCH_SIZE per request."""
    items = create_bodies(max(opts.n, BATCH_SIZE), "b", opts.same_url)
    chunks = [items[i : i + BATCH_SIZE] for i in range(0, len(items), BATCH_SIZE)]
    return measured(pid, port, chunks, "/timers/batch", BATCH_CLIENTS)


def floor_figures(lab: Lab, opts: Options, creates_per_s: int) -> dict[str, Any]:
    """The floor's creates/s from the same clients and body shape (for the burst and spread
    shapes, after their firing), and a run's `creates_per_s` as a ratio of it."""
    port, floor = start_floor(lab)
    figures = creates(floor.proc.pid, port, opts, "f").figures("creates")
    ratio = round(creates_per_s / max(figures["creates_per_s"], 1), 3)
    return {"floor": figures, "create_ratio_to_floor": ratio}


def run_create(opts: Options) -> dict[str, Any]:
    """The create shape: timerd's creates, the floor's, then batches; one JSON object."""
    with Lab(opts) as lab:
        api_port = free_port()
        api = lab.start("api", api_port)
        wait_until(lambda: healthz_ok(api_port), api, "the API's /healthz")
        single = creates(api.proc.pid, api_port, opts, "s")
        batch = batches(api.proc.pid, api_port, opts)
        api.check_alive()
        floor_port, floor = start_floor(lab)
        bare = creates(floor.proc.pid, floor_port, opts, "f")
        lab.stop()
        states = state_counts(lab.sqlite_path()) if lab.temp_store else None
    timerd_figures = single.figures("creates")
    floor_figures = bare.figures("creates")
    return {
        **run_header(opts, lab),
        **timerd_figures,
        "floor": floor_figures,
        "create_ratio_to_floor": round(
            timerd_figures["creates_per_s"] / max(floor_figures["creates_per_s"], 1), 3
        ),
        "batch": {"batch_size": BATCH_SIZE, "clients": BATCH_CLIENTS, **batch.figures("timers")},
        "states": states,
    }


def create_summary(head: str, result: dict[str, Any]) -> str:
    """The create shape's lines for stderr."""
    floor, batch = result["floor"], result["batch"]
    return (
        f"{head}\n  timerd api {result['creates_per_s']} creates/s"
        f" ({result['cpu_ms_per_create']} ms CPU each); floor {floor['creates_per_s']}/s"
        f" ({floor['cpu_ms_per_create']} ms); ratio {result['create_ratio_to_floor']}"
        f"\n  batch of {batch['batch_size']}: {batch['timers_per_s']} timers/s"
        f" ({batch['cpu_ms_per_timer']} ms CPU each); errors {result['errors'] or 'none'},"
        f" batch errors {batch['errors'] or 'none'}"
    )
