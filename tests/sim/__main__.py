"""Run the simulator over many seeds, on every core.

    python -m tests.sim --seeds 100000 [--jobs N] [--store sqlite|mongo|both] [--start S]
    python -m tests.sim --seed 1234 --store sqlite -v      # replay one seed, with its trace

A failure prints its seed and the one-line command that replays it exactly.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator

from tests.sim.run import SimResult, run_for_report
from tests.sim.world import SimConfig

STORES = ("sqlite", "mongo")
_HEX = re.compile(r"[0-9a-f]+")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, help="run this one seed (and print its trace with -v)")
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--store", choices=(*STORES, "both"), default="both")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--early-tolerance-ms", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="TEXT",
        help="violations containing TEXT do not count (to look past a known defect)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print the whole trace")
    return parser.parse_args(argv)


def _configs(args: argparse.Namespace) -> Iterator[SimConfig]:
    stores = STORES if args.store == "both" else (args.store,)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    for seed in seeds:
        for store in stores:
            yield SimConfig(
                seed=seed,
                store=store,
                verbose=args.verbose,
                early_tolerance_ms=args.early_tolerance_ms,
                ignore=tuple(args.ignore),
            )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configs = list(_configs(args))
    started = time.perf_counter()
    failed: list[SimResult] = []
    kinds: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    jobs = max(1, min(args.jobs, len(configs)))
    with multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 else _Inline() as pool:
        for done, result in enumerate(pool.imap_unordered(run_for_report, configs, chunksize=4), 1):
            totals.update({k: int(v) for k, v in result.stats.items() if k != "wall_s"})
            if args.verbose:
                print("\n".join(result.trace))
            if not result.ok:
                failed.append(result)
                kinds.update({kind_of(v) for v in result.violations})
                print(result.report(), flush=True)
            elif done % 1000 == 0:
                print(f"... {done}/{len(configs)} runs, {len(failed)} failed", flush=True)
    wall_s = time.perf_counter() - started
    _summary(configs, failed=failed, kinds=kinds, totals=totals, wall_s=wall_s, jobs=jobs)
    return 1 if failed else 0


def kind_of(violation: str) -> str:
    """A violation without its numbers and ids: what groups failures of one defect."""
    words = [
        "N" if any(c.isdigit() for c in w) or (len(w) >= 6 and _HEX.fullmatch(w)) else w
        for w in violation.split()
    ]
    return " ".join(words)[:110]


def _summary(
    configs: list[SimConfig],
    *,
    failed: list[SimResult],
    kinds: Counter[str],
    totals: Counter[str],
    wall_s: float,
    jobs: int,
) -> None:
    runs = len(configs)
    print(
        f"\n{runs} runs ({', '.join(sorted({c.store for c in configs}))}) in {wall_s:.1f} s on"
        f" {jobs} process(es): {runs / wall_s:.1f} runs/s; {len(failed)} failed"
    )
    print(
        f"simulated {totals['virtual_s'] / 3600:.1f} h, {totals['timers']} timers,"
        f" {totals['deliveries']} deliveries, {totals['kills']} kills, {totals['stalls']} stalls"
    )
    for kind, n in kinds.most_common(15):
        print(f"  {n:5d}  {kind}")
    for result in failed[:10]:
        print(f"  replay: {result.config.replay}")


class _Inline:
    """A stand-in for a one-process pool: runs in this process (replays stay debuggable)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def imap_unordered(
        self, fn: object, items: list[SimConfig], chunksize: int = 1
    ) -> Iterator[SimResult]:
        return (run_for_report(item) for item in items)


if __name__ == "__main__":
    sys.exit(main())
