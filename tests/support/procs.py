"""Real `timerd` processes for tests, started through the installed console script.

`TimerdProcesses(tmp_path).start("api", store_url)` runs `timerd api` on 127.0.0.1 with a free
port, waits (bounded, no fixed sleeps) until `GET /healthz` answers, and stops everything it
started when the `with` block ends. Each process's stderr goes to a file in `tmp_path`, and every
failure quotes it. `timerd daemon` and `timerd run` take the same flags.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx

TIMERD = Path(sys.executable).parent / "timerd"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02
_BIND_ATTEMPTS = 3  # another process may take the free port before timerd binds it
_serial = itertools.count(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


LOOPBACK_ALLOWED = {"TIMERD_ALLOWED_NETWORKS": "127.0.0.0/8"}  # receivers listen on loopback
ONE_WORKER = {"TIMERD_WORKERS": "1"}  # `timerd daemon` is one process unless a test says so


def timerd_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any `TIMERD_*` variable, JSON logs, webhooks allowed
    to reach loopback (the SSRF guard denies it by default; tests' receivers live there), one
    firing process per `timerd daemon`, then `env`, which overrides any of it
    (`TIMERD_ALLOWED_NETWORKS=""` restores the default)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIMERD_")}
    return {**clean, "TIMERD_LOG_FORMAT": "json", **LOOPBACK_ALLOWED, **ONE_WORKER, **(env or {})}


def run_timerd(
    args: Iterable[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run `timerd ARGS` to completion (for commands that should exit, such as bad settings)."""
    return subprocess.run(
        [str(TIMERD), *args],
        env=timerd_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def wait_healthy(
    base_url: str,
    popen: subprocess.Popen[bytes],
    describe: Callable[[str], str],
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Return once `GET <base_url>/healthz` answers 200; fail with `describe(...)` (which quotes
    the process's output) if the process exits first or does not answer within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        try:
            code = popen.wait(timeout=_POLL_S)  # doubles as the polling interval
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(describe(f"exited with {code} before answering /healthz"))
    raise AssertionError(describe(f"did not answer /healthz within {timeout_s}s"))


class TimerdProcess:
    """One running `timerd` subprocess."""

    def __init__(self, command: str, port: int, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.command = command
        self.port = port
        self.popen = popen
        self.stderr_path = log

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        """Everything the process wrote to stderr (and stdout) so far."""
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once `GET /healthz` answers 200 (see `wait_healthy`)."""
        wait_healthy(self.base_url, self.popen, self.describe, timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (a stall: GC pause, swapped out, VM paused) until
        `resume`; the kernel keeps its sockets and the clocks keep running."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused process carries on where it stopped."""
        self.popen.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait up to `timeout_s` for the exit code. A process that does not stop in
        time is killed and the test fails. A paused process is resumed to act on the SIGTERM."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            self.popen.send_signal(signal.SIGCONT)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                self.describe(f"did not stop within {timeout_s}s of SIGTERM")
            ) from None

    def kill(self) -> int:
        """SIGKILL (a crash, as far as timerd can tell) and reap the process."""
        if self.running():
            self.popen.kill()
        return self.popen.wait(timeout=STOP_TIMEOUT_S)

    def describe(self, what: str) -> str:
        return f"timerd {self.command} (pid {self.pid}, port {self.port}) {what}; stderr:\n" + (
            self.stderr()
        )


class TimerdProcesses:
    """Starts `timerd` processes and, on leaving the `with` block, stops those still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[TimerdProcess] = []

    def __enter__(self) -> TimerdProcesses:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def start(
        self,
        command: str,
        store: str,
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        ready: bool = True,
    ) -> TimerdProcess:
        """Start `timerd COMMAND --host 127.0.0.1 --port <free> --store STORE ARGS` with `env`
        over a clean environment; with `ready`, return only once `/healthz` answers."""
        extra = list(args)
        for _ in range(_BIND_ATTEMPTS):
            proc = self._spawn(command, store, extra, env)
            if not ready:
                return proc
            try:
                proc.wait_ready()
            except AssertionError:
                if proc.running() or "address already in use" not in proc.stderr().lower():
                    raise
                continue
            return proc
        raise AssertionError(proc.describe(f"could not bind a free port in {_BIND_ATTEMPTS} tries"))

    def _spawn(
        self, command: str, store: str, args: list[str], env: Mapping[str, str] | None
    ) -> TimerdProcess:
        port = free_port()
        log = self.log_dir / f"timerd-{command}-{next(_serial)}.stderr"
        argv = [str(TIMERD), command, "--host", HOST, "--port", str(port), "--store", store]
        if command == "daemon":  # the daemon's own /healthz, /readyz and /metrics
            argv += ["--metrics-port", str(port)]
        with log.open("wb") as sink:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                [*argv, *args],
                env=timerd_env(env),
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        proc = TimerdProcess(command, port, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM every process still running, in reverse start order; SIGKILL stragglers and
        fail once all are down."""
        stuck: list[str] = []
        for proc in reversed(self.started):
            if proc.running():
                try:
                    proc.stop()
                except AssertionError as exc:  # killed by stop(); carry on with the others
                    stuck.append(str(exc))
        if stuck:
            raise AssertionError("\n\n".join(stuck))
