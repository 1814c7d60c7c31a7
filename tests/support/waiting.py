"""Waiting for real state to change, bounded in time (tenacity does the polling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float, what: str) -> T:
    """Call `check` until it returns something truthy and return that; fail after `timeout_s`."""
    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(0.02),
        retry=retry_if_result(lambda result: not result),
        retry_error_callback=lambda _: None,
    )
    result = retrying(check)
    assert result, f"timed out after {timeout_s}s waiting for {what}"
    return result
