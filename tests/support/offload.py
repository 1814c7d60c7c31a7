"""An `Offload` (timerd.offload) for tests that drive daemon parts by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def inline(call: Callable[[], T]) -> T:
    """Run the store call on the event loop at once: a test has no threads to spare."""
    return call()
