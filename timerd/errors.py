"""Every error timerd raises on purpose, under one base class."""

from __future__ import annotations


class TimerdError(Exception):
    """Base of all timerd errors."""


class TimerNotFound(TimerdError, LookupError):
    """No timer has this id (or the id is malformed)."""


class TimerStateConflict(TimerdError):
    """The timer exists but its state does not allow the operation."""

    def __init__(self, timer_id: str, state: str) -> None:
        super().__init__(f"timer {timer_id} is {state}")
        self.timer_id = timer_id
        self.state = state


class StoreUnavailable(TimerdError):
    """The store cannot be reached, or stayed locked beyond its busy timeout."""


class WouldBlock(TimerdError):
    """A store call made inside `Store.nonblocking()` would have had to wait (for another
    writer, or for the file's lock); it changed nothing and may be made again elsewhere."""


class ConfigError(TimerdError, ValueError):
    """A setting has a value timerd cannot use; the message names the setting."""


class DaemonCrashed(TimerdError):
    """A daemon task met an error that retrying cannot fix; the process must exit non-zero so
    its supervisor (systemd, Kubernetes) restarts it. The cause holds the errors."""
