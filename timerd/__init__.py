"""timerd: self-hosted timers that fire webhooks, durably and on time."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("timerd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
