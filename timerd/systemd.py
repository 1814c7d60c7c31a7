"""The systemd notification protocol (sd_notify), for units of `Type=notify`.

Without `NOTIFY_SOCKET` in the environment (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("timerd.systemd")


def notify(state: str) -> bool:
    """Send `state` (such as `READY=1`) to systemd; return whether there was anyone to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:  # systemd went away; nothing to do about it but say so
        log.warning("sd_notify_failed", state=state, error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send `WATCHDOG=1`: half of `WatchdogSec`, or None when no watchdog is on."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


async def watchdog() -> None:
    """Tell systemd the event loop is alive (run from the loop, so a stuck loop stops it)."""
    notify("WATCHDOG=1")
