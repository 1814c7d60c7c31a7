"""The timerd HTTP API (Starlette): validates, inserts, reads and cancels timers."""

from api.app import create_app

__all__ = ["create_app"]
