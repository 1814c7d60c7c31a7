"""systemd: the unit files in systemd/ and the notify protocol the units rely on.

No systemd runs here (PID 1 is not systemd), so nothing starts a unit. Instead:
- `systemd-analyze verify` (and its offline security review) checks the units as written;
- the files' invariants (notify type, watchdog only where pings come, stop timeout above the
  drain grace, start limits that restarts cannot reach, one user and state directory, the
  example environment file) are read straight from them;
- real `timerd daemon` and `timerd api` processes get a `NOTIFY_SOCKET` the test listens on, as
  systemd would give them, and must say READY=1, WATCHDOG=1 and STOPPING=1 at the right moments;
- both processes run under the kernel's memory-deny-write-execute, as the units ask for.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from tests.support.procs import (
    HOST,
    STOP_TIMEOUT_S,
    TIMERD,
    TimerdProcess,
    TimerdProcesses,
    free_port,
    timerd_env,
)
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd import systemd
from timerd.settings import Settings, build_settings, env_name
from timerd.store import open_store

UNITS_DIR = Path(__file__).parent.parent / "systemd"
DAEMON_UNIT = "timerd-daemon.service"
API_UNIT = "timerd-api@.service"
SERVICES = (DAEMON_UNIT, API_UNIT)
TARGET = "timerd.target"
ENV_EXAMPLE = UNITS_DIR / "timerd.env.example"
INSTALLED_TIMERD = "/usr/local/bin/timerd"
STATE_DB = "sqlite:////var/lib/timerd/timerd.db"

WATCHDOG_USEC = 400_000  # pings every 0.2 s: quick to observe
MESSAGE_TIMEOUT_S = 15.0  # bound on any one expected message (covers the process start)
QUIET_WINDOW_S = 1.0  # five watchdog intervals: long enough for pings that should not come


# ---------------------------------------------------------------------------------------------
# reading unit files


Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → keys → every value given (keys such as SystemCallFilter= may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        assert not line.endswith("\\"), f"{path.name}: keep {line!r} on one line"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set once, is {values}"
    return values[0]


_SPAN_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def seconds(span: str) -> float:
    """A systemd time span as the units write them (`45s`, `2min`, `500ms`, `30`)."""
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", span)
    assert match and match[2] in {*_SPAN_UNITS, ""}, f"unexpected time span {span!r}"
    return int(match[1]) * _SPAN_UNITS.get(match[2], 1.0)


def units() -> dict[str, Unit]:
    return {name: parse_unit(UNITS_DIR / name) for name in SERVICES}


# ---------------------------------------------------------------------------------------------
# systemd-analyze


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def install_copies(dest: Path) -> dict[str, Path]:
    """Copy the units into `dest` with ExecStart= on the `timerd` script installed for these
    tests: `verify` refuses an ExecStart= binary that does not exist."""
    dest.mkdir()
    copies = {}
    for name in (*SERVICES, TARGET):
        text = (UNITS_DIR / name).read_text()
        if name in SERVICES:
            assert f"ExecStart={INSTALLED_TIMERD} " in text
            text = text.replace(f"ExecStart={INSTALLED_TIMERD} ", f"ExecStart={TIMERD} ")
        copies[name] = dest / name
        copies[name].write_text(text)
    # a template is verified through an instance; the file it loads is the template's
    copies["timerd-api@8081.service"] = dest / "timerd-api@8081.service"
    return copies


def verify(files: list[Path]) -> tuple[int, str, list[str]]:
    """`systemd-analyze verify`: its exit status, its output, and the lines about our units.

    `verify` also loads what the units depend on (network-online.target, multi-user.target and
    what they pull in) from the host, and on a host with systemd it may complain about those:
    that is not about our files, so only lines naming one of ours count (all our names and
    paths contain "timerd"). Every such line is a warning we treat as a failure: `verify` exits
    0 on unknown keys and unparsable values, which it only reports and ignores.
    """
    argv = [systemd_analyze(), "verify"]
    if _systemd_version() >= 250:  # only our units' errors decide the exit status
        argv.append("--recursive-errors=no")
    result = subprocess.run(
        [*argv, *map(str, files)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    return result.returncode, output, [line for line in output.splitlines() if "timerd" in line]


def _systemd_version() -> int:
    out = subprocess.run(
        [systemd_analyze(), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match[1]) if match else 0


def test_systemd_analyze_verify_accepts_every_unit_without_a_warning(tmp_path: Path) -> None:
    copies = install_copies(tmp_path / "units")
    named = [copies[DAEMON_UNIT], copies["timerd-api@8081.service"], copies[TARGET]]
    status, output, ours = verify(named)
    assert (status, ours) == (0, []), output


def test_the_verify_check_sees_warnings_about_our_units(tmp_path: Path) -> None:
    """The filter above must not hide what matters: a misspelt key in a copy is reported."""
    copies = install_copies(tmp_path / "units")
    daemon = copies[DAEMON_UNIT]
    daemon.write_text(daemon.read_text().replace("ProtectClock=", "ProtectClok="))
    _, output, ours = verify([daemon])
    assert any("Unknown key 'ProtectClok'" in line for line in ours), output


def test_the_units_are_hardened_by_systemd_analyze_security(tmp_path: Path) -> None:
    copies = install_copies(tmp_path / "units")
    for name in (DAEMON_UNIT, "timerd-api@8081.service"):
        result = subprocess.run(
            [systemd_analyze(), "security", "--offline=true", "--threshold=20", str(copies[name])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if "--offline" in result.stderr and "unrecognized" in result.stderr:
            pytest.skip("this systemd-analyze has no offline security review (systemd < 250)")
        # an overall exposure of 2.0 or less, which systemd rates "OK" (both are at 1.3 now)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# ---------------------------------------------------------------------------------------------
# what the unit files must say


def test_both_units_are_notify_units_run_as_one_user_on_one_state_directory() -> None:
    for name, unit in units().items():
        assert one(unit, "Service", "Type") == "notify", name
        assert one(unit, "Service", "NotifyAccess") == "main", name
        assert one(unit, "Service", "User") == one(unit, "Service", "Group") == "timerd", name
        assert "DynamicUser" not in unit["Service"], name
        assert one(unit, "Service", "StateDirectory") == "timerd", name
        assert one(unit, "Service", "Environment") == f"TIMERD_STORE={STATE_DB}", name
        assert one(unit, "Service", "EnvironmentFile") == "-/etc/timerd/timerd.env", name
        assert "timerd.target" in one(unit, "Install", "WantedBy"), name
    daemon, api = units()[DAEMON_UNIT], units()[API_UNIT]
    assert one(daemon, "Service", "ExecStart") == f"{INSTALLED_TIMERD} daemon"
    assert one(api, "Service", "ExecStart") == f"{INSTALLED_TIMERD} api --port %i"


def test_only_the_daemon_has_a_watchdog_since_only_it_pings() -> None:
    assert 10 <= seconds(one(units()[DAEMON_UNIT], "Service", "WatchdogSec")) <= 120
    assert "WatchdogSec" not in units()[API_UNIT]["Service"]


def test_the_daemon_gets_longer_to_stop_than_its_drain_grace() -> None:
    grace_s = Settings.__dataclass_fields__["drain_grace_s"].default
    assert isinstance(grace_s, float)
    daemon = units()[DAEMON_UNIT]
    assert one(daemon, "Service", "KillSignal") == "SIGTERM"
    # drain, flush outcomes and release the lease, with room to spare
    assert seconds(one(daemon, "Service", "TimeoutStopSec")) >= grace_s + 15


def test_restarts_never_reach_the_start_limit_so_a_crash_loop_is_ridden_out() -> None:
    for name, unit in units().items():
        assert one(unit, "Service", "Restart") in {"on-failure", "always"}, name
        every_s = seconds(one(unit, "Service", "RestartSec"))
        window_s = seconds(one(unit, "Unit", "StartLimitIntervalSec"))
        burst = int(one(unit, "Unit", "StartLimitBurst"))
        assert every_s >= 1, name  # not a busy loop
        most_starts = window_s // every_s + 1  # restarts RestartSec apart within one window
        assert burst > most_starts, f"{name}: {burst} starts in {window_s}s can be reached"
        # a bad setting (exit 2) cannot heal by restarting
        assert one(unit, "Service", "RestartPreventExitStatus") == "2", name


HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}


def test_both_units_carry_the_sandboxing_options() -> None:
    for name, unit in units().items():
        for key, value in HARDENING.items():
            assert one(unit, "Service", key) == value, f"{name}: {key}="
        assert "@system-service" in unit["Service"]["SystemCallFilter"], name


def example_settings() -> dict[str, str]:
    """`VAR=value` of every commented-out setting in the example environment file."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        assert not line or line.startswith("#"), f"set by default, not commented out: {line!r}"
        match = re.fullmatch(r"#(TIMERD_[A-Z0-9_]+)=(.*)", line)
        if match:
            assert match[1] not in found, f"{match[1]} listed twice"
            found[match[1]] = match[2]
    return found


def test_the_example_environment_file_lists_every_setting_with_its_default() -> None:
    listed = example_settings()
    fields = {env_name(f.name): f for f in dataclasses.fields(Settings)}
    assert set(listed) == set(fields), "systemd/timerd.env.example: list every setting, no other"
    assert listed.pop("TIMERD_STORE") == STATE_DB  # the units' default, not the CLI's
    for variable, value in listed.items():
        parsed = getattr(build_settings(None, {variable: value}), fields[variable].name)
        assert parsed == fields[variable].default, variable


# ---------------------------------------------------------------------------------------------
# the notify protocol, on its own


@pytest.fixture
def clean_notify_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_notify_socket_nothing_is_sent(clean_notify_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    clean_notify_env.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False


def test_notify_reaches_a_socket_path(clean_notify_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with Listener(tmp_path) as listener:
        clean_notify_env.setenv("NOTIFY_SOCKET", listener.address)
        assert systemd.notify("READY=1") is True
        assert listener.sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket(clean_notify_env: pytest.MonkeyPatch) -> None:
    name = f"timerd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_notify_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_a_socket_nobody_listens_on_is_reported_not_raised(
    clean_notify_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_notify_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("STOPPING=1") is False  # and logged as sd_notify_failed


@pytest.mark.parametrize(
    ("usec", "pid", "interval_s"),
    [
        ("30000000", None, 15.0),
        ("400000", "self", 0.2),
        ("400000", "other", None),  # WATCHDOG_PID names another process: not ours to ping
        ("0", None, None),
        ("", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_the_watchdog_interval_is_half_watchdog_usec_for_this_process_only(
    clean_notify_env: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    interval_s: float | None,
) -> None:
    if usec is not None:
        clean_notify_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_notify_env.setenv("WATCHDOG_PID", str(os.getpid() + (pid == "other")))
    assert systemd.watchdog_interval_s() == interval_s


# ---------------------------------------------------------------------------------------------
# the notify protocol, spoken by real processes


class Watched(Protocol):
    """A process the test listens to: TimerdProcess, or MdweProcess below."""

    popen: subprocess.Popen[bytes]

    def describe(self, what: str) -> str: ...


class Listener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, directory: Path) -> None:
        path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if len(os.fsencode(path)) < 100:  # sun_path holds 108 bytes
            self.address = str(path)
            self.sock.bind(self.address)
        else:  # a very deep tmp_path: the abstract namespace needs no path
            name = f"timerd-test-{secrets.token_hex(8)}"
            self.address = "@" + name
            self.sock.bind("\0" + name)
        self.sock.settimeout(5)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def receive(self, proc: Watched, what: str) -> str:
        """The next message; fail if none comes within MESSAGE_TIMEOUT_S or the process exits
        without sending it."""
        popen = proc.popen
        deadline = time.monotonic() + MESSAGE_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            message = self._next(timeout_s=min(0.1, left))  # 0.1 s: to notice an early exit
            if message is not None:
                return message
            if popen.poll() is not None:  # what it sent before exiting is queued already
                message = self._next(timeout_s=0)
                if message is None:
                    raise AssertionError(proc.describe(f"exited before sending {what}"))
                return message
            if left <= 0:
                raise AssertionError(proc.describe(f"sent no {what} in {MESSAGE_TIMEOUT_S}s"))

    def during(self, window_s: float) -> list[str]:
        """Every message that arrives within the next `window_s`: a bounded observation, for
        messages that must not come (there is no event to wait for instead)."""
        messages = []
        deadline = time.monotonic() + window_s
        while (left := deadline - time.monotonic()) > 0:
            message = self._next(timeout_s=left)
            if message is not None:
                messages.append(message)
        return messages

    def pending(self) -> list[str]:
        """The messages already queued."""
        messages = []
        while (message := self._next(0)) is not None:
            messages.append(message)
        return messages

    def _next(self, timeout_s: float) -> str | None:
        self.sock.settimeout(max(0.0, timeout_s))  # 0: just what is queued
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, TimeoutError):
            return None
        return data.decode()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    with Listener(tmp_path) as opened:
        yield opened


def store_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "timerd.db")


def stop(proc: TimerdProcess) -> None:
    proc.popen.send_signal(signal.SIGTERM)


def wait_exit(proc: TimerdProcess) -> int:
    try:
        return proc.popen.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(proc.describe("did not exit after SIGTERM")) from None


def test_the_daemon_says_ready_then_pings_the_watchdog_then_stopping(
    procs: TimerdProcesses, listener: Listener, tmp_path: Path
) -> None:
    env = listener.env(WATCHDOG_USEC=str(WATCHDOG_USEC))
    daemon = procs.start("daemon", store_url(tmp_path), env=env, ready=False)

    assert listener.receive(daemon, "READY=1") == "READY=1"  # and nothing before it
    # ready once its first lease attempt is done: alone on the store, it leads already
    with closing(open_store(store_url(tmp_path))) as store:
        leases = [lease for lease in store.leases() if lease.name.startswith("p")]
    assert len(leases) == store.partitions()
    assert min(lease.expires_at_ms for lease in leases) > time.time() * 1000

    pings = [listener.receive(daemon, "WATCHDOG=1") for _ in range(2)]
    assert pings == ["WATCHDOG=1", "WATCHDOG=1"]

    stop(daemon)
    after_stop = listener.receive(daemon, "STOPPING=1")
    while after_stop == "WATCHDOG=1":  # a ping already due when the signal came
        after_stop = listener.receive(daemon, "STOPPING=1")
    assert after_stop == "STOPPING=1"
    assert wait_exit(daemon) == 0
    # pings may go on while it drains; nothing else may follow
    assert set(listener.pending()) <= {"WATCHDOG=1"}


def test_the_daemon_leaves_a_watchdog_meant_for_another_process_alone(
    procs: TimerdProcesses, listener: Listener, tmp_path: Path
) -> None:
    env = listener.env(WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID=str(os.getpid()))
    daemon = procs.start("daemon", store_url(tmp_path), env=env, ready=False)
    assert listener.receive(daemon, "READY=1") == "READY=1"
    assert listener.during(QUIET_WINDOW_S) == []  # five intervals without a ping
    stop(daemon)
    assert listener.receive(daemon, "STOPPING=1") == "STOPPING=1"
    assert wait_exit(daemon) == 0
    assert listener.pending() == []


def test_the_api_says_ready_once_it_listens_and_stopping_on_sigterm(
    procs: TimerdProcesses, listener: Listener, tmp_path: Path
) -> None:
    api = procs.start("api", store_url(tmp_path), env=listener.env(), ready=False)
    assert listener.receive(api, "READY=1") == "READY=1"
    # READY=1 comes once the port listens: it answers at once, no retrying
    assert httpx.get(f"{api.base_url}/healthz", timeout=5).status_code == 200
    stop(api)
    assert listener.receive(api, "STOPPING=1") == "STOPPING=1"
    assert wait_exit(api) == 0
    assert listener.pending() == []


# ---------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes, as the kernel's PR_SET_MDWE (Linux 6.3+) enforces it


# Refuse writable+executable memory from here on (inherited across execve), then exec argv[1:].
# systemd's MemoryDenyWriteExecute= is a seccomp filter refusing the same mappings.
MDWE_EXEC = """
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""
WX_MAPPING = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # PROT_READ | PROT_WRITE | PROT_EXEC


def under_mdwe(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", MDWE_EXEC, *argv]


class MdweProcess:
    """`timerd ARGV` started under MDWE, its output in `log`."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as sink:
            self.popen = subprocess.Popen(
                under_mdwe([str(TIMERD), *argv]),
                env=timerd_env(env),
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def describe(self, what: str) -> str:
        return f"timerd under MDWE (pid {self.popen.pid}) {what}; output:\n{self.log.read_text()}"

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(self.describe("did not stop on SIGTERM")) from None


def test_timerd_runs_without_writable_executable_memory(listener: Listener, tmp_path: Path) -> None:
    probe = subprocess.run(
        under_mdwe([sys.executable, "-c", WX_MAPPING]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, "MDWE not in force"

    store = ["--host", HOST, "--store", store_url(tmp_path)]
    env = {"TIMERD_ALLOWED_NETWORKS": "127.0.0.0/8", "TIMERD_METRICS_PORT": str(free_port())}
    port = free_port()
    with ExitStack() as stack:
        api = MdweProcess(["api", *store, "--port", str(port)], env, tmp_path / "api.log")
        stack.callback(api.stop)
        base = f"http://{HOST}:{port}"
        wait_until(lambda: _healthy(base, api), 15, "the API under MDWE to answer")
        # only then the daemon: this test is not about two processes creating one SQLite file
        daemon = MdweProcess(["daemon", *store], listener.env(**env), tmp_path / "daemon.log")
        stack.callback(daemon.stop)
        assert listener.receive(daemon, "READY=1") == "READY=1"
        with Receiver() as receiver:
            answer = httpx.post(
                f"{base}/timers", json={"seconds": 0.05, "url": receiver.url}, timeout=5
            )
            assert answer.status_code == 201, answer.text
            [arrival] = receiver.wait_for(1, timeout_s=10)
        assert arrival.timer_id == answer.json()["id"]
        assert (daemon.stop(), api.stop()) == (0, 0)
    for proc in (api, daemon):
        assert "Traceback" not in proc.log.read_text(), proc.describe("logged a traceback")


def _healthy(base: str, api: MdweProcess) -> bool:
    assert api.popen.poll() is None, api.describe("exited")
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
