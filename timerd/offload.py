"""Where the daemon's store calls run: in thread pools or on its event loop, inline in tests.

The daemon hands each store call, as a function of no arguments, to an `Offload`: a thread pool,
or its event loop itself for the calls a store can make without waiting (`hybrid_offload`). The
simulator passes one that runs it at once in virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from timerd.errors import WouldBlock

T = TypeVar("T")


class Offload(Protocol):
    """Runs a blocking call off the event loop and returns its result."""

    def __call__(self, call: Callable[[], T], /) -> Awaitable[T]: ...


def pool_offload(pool: Executor) -> Offload:
    """An `Offload` that runs calls in `pool`."""

    async def offload(call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    return offload


def hybrid_offload(context: AbstractContextManager[None], elsewhere: Offload) -> Offload:
    """An `Offload` that makes each call on the event loop itself, inside `context` (a
    store's `nonblocking()`), and hands it to `elsewhere` only when it would have had to wait.
    Uncontended, a thread hop costs more than most store calls themselves."""

    async def offload(call: Callable[[], T]) -> T:
        try:
            with context:
                return call()
        except WouldBlock:
            return await elsewhere(call)

    return offload


def thread_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """A pool of its own, so a blocked call elsewhere (DNS, a slow scrape) cannot delay it."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
