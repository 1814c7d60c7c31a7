"""Python's cyclic garbage collector, set for a long-running server.

CPython collects its youngest generation every 700 net allocations of container objects, and
each collection walks every object in it; a create or a fire allocates a few hundred, nearly all
of them freed at once by reference counting. With those defaults `timerd api` spent about a
sixth of a create's CPU in the collector, walking the objects of the requests under way and, in
full collections, everything the imports had left behind. `serving()` moves what exists once a
process has started (modules, the app, its settings: never garbage) out of every collection,
and collects the youngest generation after `YOUNG_THRESHOLD` allocations, so what reference
counting frees is gone before a collection looks at it. Cyclic garbage is still collected.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
DEFAULT_THRESHOLDS = gc.get_threshold()


def serving() -> None:
    """Freeze what exists now out of the collector's reach and raise the young threshold:
    call once, when the process is set up and about to serve."""
    gc.collect()
    gc.freeze()
    _, middle, old = DEFAULT_THRESHOLDS
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def defaults() -> None:
    """Undo `serving()` (for measurements that compare with code that does not call it)."""
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_THRESHOLDS)
