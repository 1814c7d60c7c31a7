"""Where the daemon's blocking store calls run: thread pools in production, inline in tests.

The daemon never calls the store on its event loop; it hands each call, as a function of no
arguments, to an `Offload`. The simulator passes one that runs it at once in virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol, TypeVar

T = TypeVar("T")


class Offload(Protocol):
    """Runs a blocking call off the event loop and returns its result."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


def pool_offload(pool: Executor) -> Offload:
    """An `Offload` that runs calls in `pool`."""

    async def offload(call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    return offload


def thread_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """A pool of its own, so a blocked call elsewhere (DNS, a slow scrape) cannot delay it."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
