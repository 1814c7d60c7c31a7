"""How long a daemon task waits before trying the store again after it failed."""

from __future__ import annotations

import random

DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # the last repeats


class Backoff:
    """Growing delays, with ±20 % jitter so daemons that lost the store together do not
    return to it in step."""

    def __init__(self) -> None:
        self.failures = 0

    def next_s(self) -> float:
        """The delay after one more failure."""
        base = DELAYS_S[min(self.failures, len(DELAYS_S) - 1)]
        self.failures += 1
        return base * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """The store answered again."""
        self.failures = 0
