"""`timerd daemon --workers N`: N firing processes from one command, under one service unit.

The parent starts N children (`timerd daemon --workers 1`, the same settings otherwise, child
`i` trying metrics port `TIMERD_METRICS_PORT + i` first) and stands between them and systemd,
speaking its notify protocol on both sides: it says READY=1 once every child has, WATCHDOG=1
only while every child keeps pinging, and STOPPING=1 when told to stop, which it passes on to
the children. A child that exits on its own ends the others, and the parent exits non-zero, so
the service manager restarts the group. The daemons share the partitions like any others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import structlog

from timerd import systemd
from timerd.models import PARTITIONS
from timerd.settings import Settings, env_name

log = structlog.get_logger("timerd.workers")

_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid of the sender (SCM_CREDENTIALS)


def worker_count(settings: Settings) -> int:
    """How many firing processes `timerd daemon` runs: `TIMERD_WORKERS`, or by default one per
    core it may use (`available_cpus`). Since a daemon makes its SQLite claims and outcomes on
    its event loop, a process seldom waits, and on two cores two processes fired a 20,000
    burst faster than three in 6 of 8 paired runs (median 4,340 against 3,918 fires/s;
    BENCHMARKS.md, 2026-12-07). Never more by default than there are partitions: a process
    without one would only wait."""
    return settings.workers or min(available_cpus(), PARTITIONS)


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The cores this process may use: those its affinity allows (a cpuset, `taskset`), and
    no more than its cgroup's CPU quota (a container's CPU limit, systemd's `CPUQuota=`),
    rounded up. `os.cpu_count()` counts the whole host's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root, own_cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _cpu_quota(cgroup_root: Path, own_cgroup: Path) -> float | None:
    """The CPUs the tightest cgroup v2 `cpu.max` over this process's cgroup and its parents
    allows; None without a limit (or without cgroup v2)."""
    try:
        own = next(line[3:] for line in own_cgroup.read_text().splitlines() if line[:3] == "0::")
    except (OSError, StopIteration):
        return None
    leaf = cgroup_root / own.strip().lstrip("/")
    quotas = [
        _cpu_max(group / "cpu.max")
        for group in (leaf, *leaf.parents)
        if group.is_relative_to(cgroup_root)
    ]
    limits = [q for q in quotas if q is not None]
    return min(limits) if limits else None


def _cpu_max(path: Path) -> float | None:
    """The CPUs one `cpu.max` file allows ("<quota> <period>"); None for "max" or no file."""
    try:
        quota, period = path.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def child_env(settings: Settings, index: int, notify_socket: str) -> dict[str, str]:
    """The environment of child `index`: every setting as its variable, one worker, its own
    first metrics port, and the parent's notify socket in place of systemd's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIMERD_", "WATCHDOG_"))}
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        env[env_name(field.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    env["TIMERD_WORKERS"] = "1"
    if settings.metrics_port:
        env["TIMERD_METRICS_PORT"] = str(settings.metrics_port + index)
    env["NOTIFY_SOCKET"] = notify_socket
    watchdog_s = systemd.watchdog_interval_s()
    if watchdog_s is not None:
        env["WATCHDOG_USEC"] = str(int(watchdog_s * 2_000_000))
    return env


class Workers:
    """The parent of the firing processes."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._children: list[asyncio.subprocess.Process] = []
        self._ready: set[int] = set()
        self._pinged: set[int] = set()
        self._stopping = False
        self._all_ready = asyncio.Event()

    def stop(self) -> None:
        """Stop every child (SIGTERM: each drains and hands its partitions over)."""
        if not self._stopping:
            systemd.notify("STOPPING=1")
        self._stopping = True
        for child in self._children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)

    async def run(self) -> int:
        """Run the children until they all exit; return the exit code for the parent."""
        with tempfile.TemporaryDirectory(prefix="timerd-workers-") as folder:
            path = str(Path(folder) / "notify")
            with _notify_socket(path) as sock:
                asyncio.get_running_loop().add_reader(sock.fileno(), self._hear, sock)
                for index in range(self.count):
                    await self._spawn(index, path)
                log.info("workers_started", pids=[c.pid for c in self._children])
                watchdog = asyncio.create_task(self._relay_watchdog())
                try:
                    return await self._wait()
                finally:
                    watchdog.cancel()
                    asyncio.get_running_loop().remove_reader(sock.fileno())

    async def _spawn(self, index: int, notify_socket: str) -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "timerd",
            "daemon",
            env=child_env(self.settings, index, notify_socket),
        )
        self._children.append(child)

    async def _wait(self) -> int:
        waits = {asyncio.ensure_future(c.wait()): c for c in self._children}
        code = 0
        while waits:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                child = waits.pop(finished)
                if not self._stopping:
                    log.error("worker_exited", pid=child.pid, returncode=child.returncode)
                    self.stop()
                    code = 1
                code = code or (1 if child.returncode else 0)
        return code

    def _hear(self, sock: socket.socket) -> None:
        """One notify message from a child: READY=1, WATCHDOG=1 or STOPPING=1."""
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        except BlockingIOError:
            return
        pid = next(
            (
                _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            ),
            0,
        )
        states = set(data.decode(errors="replace").split("\n"))
        if "READY=1" in states:
            self._ready.add(pid)
            if len(self._ready) == self.count and not self._all_ready.is_set():
                self._all_ready.set()
                systemd.notify("READY=1")
        if "WATCHDOG=1" in states:
            self._pinged.add(pid)

    async def _relay_watchdog(self) -> None:
        """WATCHDOG=1 upstream each interval in which every child pinged: one stuck child is
        enough for systemd to restart the group."""
        interval_s = systemd.watchdog_interval_s()
        if interval_s is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            if {c.pid for c in self._children} <= self._pinged:
                systemd.notify("WATCHDOG=1")
            self._pinged.clear()


@contextlib.contextmanager
def _notify_socket(path: str) -> Iterator[socket.socket]:
    """A datagram socket at `path` that tells each message's sender (SO_PASSCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        sock.setblocking(False)
        yield sock
