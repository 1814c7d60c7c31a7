"""A deterministic simulator of timerd's daemons (issue 9), after FoundationDB's simulation
tests and TigerBeetle's VOPR: one integer seed drives time, faults and every actor, and a
failing seed replays exactly.

    python -m tests.sim --seeds 100000 [--jobs N] [--store sqlite|mongo] [--start S]
    python -m tests.sim --seed 1234 --store sqlite -v       # replay one, with its trace

- `loop.py`: a virtual-time event loop. When every task waits, the clock jumps to the next
  timer; `select(None)` with nothing scheduled is a deadlock. No threads: store calls run
  inline through the daemon's `offload` seam (and `run_in_executor` runs inline too).
- `faults.py`: `FaultyStore`, one process's view of the shared store. Per call, by the seed:
  fail before applying, apply (a batch: part of it) and then fail, a duplicate key on insert;
  every error a real driver exception raised through the adapter's own translator. A killed
  process's view is dead; a stall can be aimed at one store operation, before or after it lands.
- `receivers.py`: webhook receivers (2xx, 4xx, 5xx, 429 with Retry-After of every shape, resets,
  hangs, slow answers, exceptions from `deliver` itself) and the ledger of every delivery on
  the true clock.
- `world.py`: the world of one seed: a store (SQLite file or mongomock, with the seed's partition
  count), two or three daemons with skewed clocks, an API creating, moving and cancelling
  timers, and the chaos (kills, restarts, stalls) of the active phase; then a quiet phase (no
  faults, every daemon alive, receivers answering 2xx) until everything settles, and a clean
  stop of every daemon.
- `invariants.py`: what must hold at the end (and, where cheap, every half second).
- `run.py`: one seed from start to verdict; `__main__.py`: many seeds on every core.
"""
