"""`timerd bench`: how fast timerd creates and fires timers on this machine, over loopback.

    timerd bench --shape burst   --n 20000              # every timer due at one instant
    timerd bench --shape spread  --n 20000 --rate 1000  # due evenly, `rate` per second
    timerd bench --shape backlog --n 1000000            # memory and start-up over a big backlog

Burst and spread start, as child processes, a raw-asyncio HTTP receiver, one `timerd api` and one
`timerd daemon` (random free ports, a temporary SQLite file unless --store is given), create the
timers through the API from --clients concurrent clients with absolute `fire_at` times, and wait
for them to arrive. Backlog writes N pending timers due a day from now straight into the SQLite
file, plus one due a second after the daemon starts, starts only the daemon, and reports when that
timer arrived and the daemon's resident memory.

Prints one JSON line with every figure on stdout and a short summary on stderr. Children log at
--log-level (warning by default, so per-delivery lines do not dominate); other `TIMERD_*`
variables in the environment reach them unchanged. Every child and temporary file is removed at
the end. The ceiling to compare with (every due time in one process's memory, no store) is a
separate script; run it in the same sitting:

    python ../shared/bench/ceiling.py --shape burst --n 20000

A benchmark, not a test: the suite never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn, TypeVar, cast

import aiohttp

from timerd.models import Timer, new_timer_id, partition_lease
from timerd.store import open_store
from timerd.store.sqlite import SqliteStore

T = TypeVar("T")
Arrival = tuple[str, float]  # (timer id from the path, arrival time in epoch seconds)

HOOK_PATH = "/hook"
START_TIMEOUT_S = 20.0  # for the receiver, /healthz and the leader lease
STOP_TIMEOUT_S = 25.0  # SIGTERM lets the daemon drain; SIGKILL after this
SETTLE_S = 1.0  # after the last expected arrival, to catch duplicates
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)
CALIBRATION_MAX = 2000  # creates (then cancelled) that measure the API before the real run
CANCEL_CLIENTS = 4  # concurrent cancels of the calibration timers
BACKLOG_CHUNK = 20_000  # timers per transaction when writing the backlog
BACKLOG_DUE_AFTER_MS = 86_400_000  # backlog timers are due a day from now
DUE_AFTER_START_MS = 1000  # the backlog's one due timer, after the daemon starts
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class BenchError(Exception):
    """The benchmark could not run (a child did not start, the API failed, …)."""


@dataclass(frozen=True, slots=True)
class Options:
    """The flags of one `timerd bench` run."""

    shape: str
    n: int
    rate: float
    clients: int
    store: str | None
    log_level: str
    lead_s: float | None
    margin_s: float | None

    @property
    def margin(self) -> float:
        """How long after the last due instant the run waits for stragglers."""
        return self.margin_s if self.margin_s is not None else 10 + self.n / 1000


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `timerd bench`."""
    parser.add_argument("--shape", choices=("burst", "spread", "backlog"), default="burst")
    parser.add_argument("--n", type=int, default=20_000, help="how many timers (default 20000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="timers/s due for spread")
    parser.add_argument("--clients", type=int, default=64, help="concurrent create requests")
    parser.add_argument("--store", help="store URL (default: a temporary SQLite file)")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    parser.add_argument("--lead-s", type=float, help="seconds from creation start to the due time")
    parser.add_argument("--margin-s", type=float, help="wait this long past the last due time")


def options(args: argparse.Namespace) -> Options:
    """Checked options from parsed flags."""
    opts = Options(
        shape=args.shape,
        n=args.n,
        rate=args.rate,
        clients=args.clients,
        store=args.store,
        log_level=args.log_level,
        lead_s=args.lead_s,
        margin_s=args.margin_s,
    )
    if opts.n < (0 if opts.shape == "backlog" else 1) or opts.rate <= 0 or opts.clients < 1:
        raise BenchError("--n, --rate and --clients must be positive")
    if opts.shape == "backlog" and opts.store and not opts.store.startswith("sqlite:"):
        raise BenchError("the backlog shape writes into a SQLite file: give a sqlite:/// URL")
    return opts


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fire_at(ms: int) -> str:
    """Epoch milliseconds as the RFC 3339 `fire_at` the API takes, exact to the millisecond."""
    moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds")


# the receiver: a child process that records arrivals and answers 200


class _HookProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1: records `(id, arrival)` for each `POST /hook/<id>`, answers 200."""

    def __init__(self, arrivals: list[Arrival], seen: set[str]) -> None:
        self._arrivals = arrivals
        self._seen = seen
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._buf += data
        while (path := self._next_request_path()) is not None:
            if path.startswith(HOOK_PATH + "/"):
                timer_id = path[len(HOOK_PATH) + 1 :].split("?")[0]
                self._arrivals.append((timer_id, now))
                self._seen.add(timer_id)
            assert self._transport is not None
            self._transport.write(OK_RESPONSE)

    def _next_request_path(self) -> str | None:
        head_end = self._buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self._buf[:head_end].split(b"\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self._buf) < head_end + 4 + length:
            return None
        self._buf = self._buf[head_end + 4 + length :]
        return head[0].split(b" ")[1].decode("latin-1")


def _receiver_main(conn: Connection) -> None:
    asyncio.run(_serve_hooks(conn))


async def _serve_hooks(conn: Connection) -> None:
    arrivals: list[Arrival] = []
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _HookProtocol(arrivals, seen), "127.0.0.1", 0, backlog=4096
    )
    conn.send(server.sockets[0].getsockname()[1])
    while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
        conn.send(len(seen) if command == "count" else arrivals)
    server.close()


class Receiver:
    """The parent's handle on the receiver process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_receiver_main, args=(child_conn,), name="timerd-bench-receiver", daemon=True
        )
        self.process.start()
        child_conn.close()
        self.port: int = self._reply()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    def _reply(self) -> Any:
        try:
            if self._conn.poll(START_TIMEOUT_S):
                return self._conn.recv()
        except EOFError:
            raise BenchError("the receiver process exited") from None
        raise BenchError("the receiver did not answer")

    def unique(self) -> int:
        """How many distinct timer ids arrived so far."""
        self._conn.send("count")
        return cast(int, self._reply())

    def arrivals(self) -> list[Arrival]:
        """Every arrival so far, in arrival order."""
        self._conn.send("dump")
        return cast(list[Arrival], self._reply())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


# timerd child processes


def timerd_command() -> list[str]:
    """The real `timerd` console script next to this interpreter."""
    script = Path(sys.executable).with_name("timerd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from timerd.cli import main; main()"]


def free_port() -> int:
    import socket  # noqa: PLC0415 -- only this helper needs it

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Child:
    """One `timerd` subprocess and the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"timerd {self.name} exited with {self.proc.returncode}")

    def stop(self) -> None:
        """SIGTERM (the daemon drains and releases its lease), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int, key: str) -> int:
    """A `Vm…` line of /proc/<pid>/status in kB (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


class Lab:
    """The receiver, the timerd children and the temporary files of one run.

    Use as a context manager: on exit (also on errors and Ctrl-C) every child is stopped, the
    tail of each child's log is shown if something went wrong, and the temporary files go.
    """

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.dir = Path(tempfile.mkdtemp(prefix="timerd-bench-"))
        self.temp_store = opts.store is None
        self.store_url = opts.store or f"sqlite:///{self.dir / 'timerd.db'}"
        self.children: dict[str, Child] = {}
        self.receiver: Receiver | None = None

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if isinstance(exc, Exception):  # not on Ctrl-C or SIGTERM
            self._show_logs()
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the daemon, then the API, then the receiver; safe to call twice."""
        for child in reversed(list(self.children.values())):
            child.stop()
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None

    def start_receiver(self) -> Receiver:
        self.receiver = Receiver()
        return self.receiver

    def start(self, command: str, port: int | None = None) -> Child:
        """Start `timerd <command>` on this run's store."""
        log_path = self.dir / f"{command}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(  # noqa: S603 -- our own console script, fixed arguments
                [*timerd_command(), command],
                env=self._env(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench, which stops them in order
            )
        self.children[command] = Child(command, proc, log_path)
        return self.children[command]

    def _env(self, port: int | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TIMERD_STORE=self.store_url,
            TIMERD_HOST="127.0.0.1",
            TIMERD_LOG_LEVEL=self.opts.log_level,
        )
        allowed = (env.get("TIMERD_ALLOWED_NETWORKS", ""), "127.0.0.0/8")  # the receiver's
        env["TIMERD_ALLOWED_NETWORKS"] = ",".join(filter(None, allowed))
        if port is not None:
            env["TIMERD_PORT"] = str(port)
        return env

    def sqlite_path(self) -> str:
        """The file of a sqlite:/// store URL (as `open_store` reads it)."""
        path = urllib.parse.urlsplit(self.store_url).path
        return path[1:] if path.startswith("/") else path

    def _show_logs(self, lines: int = 20) -> None:
        for child in self.children.values():
            with contextlib.suppress(OSError):
                tail = child.log_path.read_text(errors="replace").splitlines()[-lines:]
                print(f"--- last lines of timerd {child.name}:", *tail, sep="\n", file=sys.stderr)


def wait_until(ready: Callable[[], bool], child: Child, what: str) -> None:
    """Poll `ready` every 50 ms for at most START_TIMEOUT_S while `child` is alive."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        child.check_alive()
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what}")


def healthz_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def wait_for_leader(store_url: str, daemon: Child) -> None:
    store = open_store(store_url)
    try:

        def leading() -> bool:
            lease = store.get_lease(partition_lease(0))
            return lease is not None and lease.expires_at_ms > now_ms()

        wait_until(leading, daemon, "the daemon to take the leader lease")
    finally:
        store.close()


def state_counts(sqlite_path: str) -> dict[str, int]:
    """How many timers the store holds in each state (read after the children stopped)."""
    with contextlib.closing(sqlite3.connect(sqlite_path)) as conn:
        rows = conn.execute("SELECT state, COUNT(*) FROM timers GROUP BY state").fetchall()
    return {str(state): int(count) for state, count in rows}


# creating timers through the API


async def for_each(
    items: Iterable[T], clients: int, deadline: float, work: Callable[[T], Awaitable[None]]
) -> None:
    """Run `work` over `items` from `clients` concurrent workers; none starts past `deadline`
    (monotonic)."""
    shared = iter(items)  # each item is taken by exactly one worker

    async def worker() -> None:
        for item in shared:
            if time.monotonic() > deadline:
                return
            await work(item)

    await asyncio.gather(*(worker() for _ in range(clients)))


class ApiClient:
    """Creates (and cancels) timers through one API over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, port: int, hook_url: str) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.hook_url = hook_url
        self.created: dict[str, int] = {}  # timer id -> due time (epoch ms)
        self.errors: Counter[str] = Counter()

    async def create(self, due_ms: int) -> None:
        body = {"url": self.hook_url, "fire_at": fire_at(due_ms)}
        try:
            async with self.session.post(f"{self.base}/timers", json=body) as response:
                if response.status != 201:
                    self.errors[f"create http {response.status}"] += 1
                    return
                self.created[(await response.json())["id"]] = due_ms
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[f"create {type(exc).__name__}"] += 1

    async def cancel(self, timer_id: str) -> None:
        try:
            async with self.session.delete(f"{self.base}/timers/{timer_id}") as response:
                if response.status != 200:
                    self.errors[f"cancel http {response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[f"cancel {type(exc).__name__}"] += 1


@dataclass(frozen=True, slots=True)
class Creation:
    """The outcome of the creation phase."""

    due_ms: dict[str, int]
    errors: dict[str, int]
    elapsed_s: float
    due_at_s: float  # T: the burst instant, or when the first spread timer is due
    ended_at_s: float  # when the last create was answered (epoch seconds)
    calibration_per_s: float | None
    calibration_errors: dict[str, int]


async def calibrate(api: ApiClient, opts: Options) -> tuple[float, float]:
    """Create (then cancel) a few timers due tomorrow, to warm the API up and size the lead:
    returns (creates/s measured, lead in seconds)."""
    count = min(opts.n, CALIBRATION_MAX)
    due = now_ms() + BACKLOG_DUE_AFTER_MS
    started = time.monotonic()
    await for_each([due] * count, opts.clients, started + 120, api.create)
    rate = max(len(api.created), 1) / (time.monotonic() - started)
    # cancels are single autocommit writes: 64 at once make some wait out SQLite's busy timeout
    await for_each(list(api.created), CANCEL_CLIENTS, time.monotonic() + 120, api.cancel)
    api.created.clear()
    return rate, min(300.0, 3 + 1.5 * opts.n / rate)


def due_times(opts: Options, t_ms: int) -> Iterator[int]:
    if opts.shape == "burst":
        return (t_ms for _ in range(opts.n))
    return (t_ms + round(i * 1000 / opts.rate) for i in range(opts.n))


async def create_timers(opts: Options, api_port: int, hook_url: str) -> Creation:
    """Create the N timers due at T = start + lead; no create starts after T."""
    connector = aiohttp.TCPConnector(limit=opts.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        api = ApiClient(session, api_port, hook_url)
        measured, lead_s = (None, opts.lead_s) if opts.lead_s else await calibrate(api, opts)
        calibration_errors, api.errors = dict(api.errors), Counter()
        t_ms = now_ms() + round(lead_s * 1000)
        started = time.monotonic()
        await for_each(due_times(opts, t_ms), opts.clients, started + lead_s, api.create)
        elapsed = time.monotonic() - started
    return Creation(
        api.created,
        dict(api.errors),
        elapsed,
        t_ms / 1000,
        time.time(),
        measured,
        calibration_errors,
    )


# firing: burst and spread


def wait_for_arrivals(receiver: Receiver, expected: int, deadline_s: float) -> list[Arrival]:
    """Poll until `expected` distinct ids arrived or `deadline_s` (epoch) passed; then settle
    briefly so late duplicates are counted too."""
    while time.time() < deadline_s and receiver.unique() < expected:
        time.sleep(0.2)
    time.sleep(SETTLE_S)
    return receiver.arrivals()


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The same nearest-rank pick as ceiling.py, so the two are comparable."""
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def firing_figures(shape: str, creation: Creation, arrivals: list[Arrival]) -> dict[str, Any]:
    """fires/s, lateness (arrival minus due) p50/p99/max in ms, lost and duplicate ids."""
    due_ms = creation.due_ms
    known = [(timer_id, at) for timer_id, at in arrivals if timer_id in due_ms]
    counts = Counter(timer_id for timer_id, _ in known)
    figures: dict[str, Any] = {
        "arrived": len(known),
        "lost": sum(1 for timer_id in due_ms if timer_id not in counts),
        "duplicates": sum(1 for c in counts.values() if c > 1),
        "strangers": len(arrivals) - len(known),
    }
    if not known:
        return figures
    late = sorted(at * 1000 - due_ms[timer_id] for timer_id, at in known)
    first, last = known[0][1], max(at for _, at in known)
    span = last - (first if shape == "burst" else creation.due_at_s)
    figures |= {
        "fires_per_s": round(len(known) / max(span, 1e-9)),
        "late_ms_p50": round(percentile(late, 50), 2),
        "late_ms_p99": round(percentile(late, 99), 2),
        "late_ms_max": round(late[-1], 2),
        "early": sum(1 for x in late if x < 0),
    }
    return figures


def creation_figures(creation: Creation, opts: Options) -> dict[str, Any]:
    created = len(creation.due_ms)
    return {
        "created": created,
        "create_errors": creation.errors,
        "creates_per_s": round(created / max(creation.elapsed_s, 1e-9)),
        "calibration_creates_per_s": creation.calibration_per_s
        and round(creation.calibration_per_s),
        "calibration_errors": creation.calibration_errors,
        "created_before_due": creation.ended_at_s < creation.due_at_s and created == opts.n,
        "creation_done_s_before_due": round(creation.due_at_s - creation.ended_at_s, 2),
    }


class CpuMeter:
    """CPU seconds used by each process of the run between two marks."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        used = {name: cpu_s(pid) for name, pid in self.pids.items()}
        return used | {"bench": time.process_time()}

    def lap(self) -> dict[str, float]:
        now = self._read()
        lap = {name: round(now[name] - self._last[name], 2) for name in now}
        self._last = now
        return lap


def start_api_and_daemon(lab: Lab) -> tuple[int, Child]:
    if lab.temp_store:
        SqliteStore(lab.sqlite_path()).close()  # the schema, before two processes race for it
    port = free_port()
    api = lab.start("api", port)
    wait_until(lambda: healthz_ok(port), api, "the API's /healthz")
    daemon = lab.start("daemon")
    wait_for_leader(lab.store_url, daemon)
    return port, daemon


def run_firing(opts: Options) -> dict[str, Any]:
    """The burst and spread shapes."""
    with Lab(opts) as lab:
        receiver = lab.start_receiver()
        api_port, daemon = start_api_and_daemon(lab)
        pids = {name: child.proc.pid for name, child in lab.children.items()}
        meter = CpuMeter(pids | {"receiver": receiver.process.pid or 0})
        creation = asyncio.run(create_timers(opts, api_port, receiver.url))
        cpu_create = meter.lap()
        last_due_s = creation.due_at_s + (0 if opts.shape == "burst" else opts.n / opts.rate)
        arrivals = wait_for_arrivals(receiver, len(creation.due_ms), last_due_s + opts.margin)
        cpu_fire = meter.lap()
        daemon.check_alive()
        lab.stop()
        states = state_counts(lab.sqlite_path()) if lab.temp_store else None
    return {
        **run_header(opts, lab),
        **creation_figures(creation, opts),
        **firing_figures(opts.shape, creation, arrivals),
        "states": states,
        "cpu_s_create": cpu_create,
        "cpu_s_fire": cpu_fire,
    }


def run_header(opts: Options, lab: Lab) -> dict[str, Any]:
    header: dict[str, Any] = {"shape": opts.shape, "n": opts.n}
    if opts.shape == "spread":
        header["rate"] = opts.rate
    if opts.shape != "backlog":
        header["clients"] = opts.clients
    store = "temporary sqlite" if lab.temp_store else opts.store
    return header | {"store": store, "log_level": opts.log_level, "cpus": os.cpu_count()}


# backlog: memory and start-up over N pending timers


def write_backlog(path: str, url: str, n: int) -> float:
    """Write `n` pending timers due from a day on through the store's own `insert_many`, a
    chunk per transaction (durability off: a scratch file); return seconds."""
    started = time.monotonic()
    far_ms = now_ms() + BACKLOG_DUE_AFTER_MS
    store = SqliteStore(path, synchronous="OFF")
    try:
        for start in range(0, n, BACKLOG_CHUNK):
            chunk = range(start, min(n, start + BACKLOG_CHUNK))
            store.insert_many([backlog_timer(url, far_ms + i * 10) for i in chunk])
    finally:
        store.close()
    return time.monotonic() - started


def backlog_timer(url: str, due_ms: int) -> Timer:
    return Timer(id=new_timer_id(), url=url, due_at_ms=due_ms, created_at_ms=now_ms())


def insert_due_timer(path: str, url: str, due_ms: int) -> str:
    store = SqliteStore(path)
    try:
        return store.insert(backlog_timer(url, due_ms)).id
    finally:
        store.close()


def wait_for_first(receiver: Receiver, daemon: Child, timeout_s: float) -> list[Arrival]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and receiver.unique() < 1:
        daemon.check_alive()
        time.sleep(0.01)
    return receiver.arrivals()


def run_backlog(opts: Options) -> dict[str, Any]:
    """The backlog shape: only the daemon, over N far-future timers and one due soon."""
    with Lab(opts) as lab:
        receiver = lab.start_receiver()
        path = lab.sqlite_path()
        write_s = write_backlog(path, receiver.url, opts.n)
        started_s = time.time()
        due_ms = int(started_s * 1000) + DUE_AFTER_START_MS
        timer_id = insert_due_timer(path, receiver.url, due_ms)
        daemon = lab.start("daemon")
        arrivals = wait_for_first(receiver, daemon, 30.0)
        time.sleep(SETTLE_S)  # a poll or two more, then read its memory
        pid = daemon.proc.pid
        rss_kb, hwm_kb = memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM")
        db_mb = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) / 1e6
    arrived = [at for i, at in arrivals if i == timer_id]
    return {
        **run_header(opts, lab),
        "write_s": round(write_s, 2),
        "db_mb": round(db_mb, 1),
        "due_ms_after_start": DUE_AFTER_START_MS,
        "fired_s_after_start": round(arrived[0] - started_s, 3) if arrived else None,
        "late_ms": round(arrived[0] * 1000 - due_ms, 2) if arrived else None,
        "rss_mb": round(rss_kb / 1024, 1),
        "hwm_mb": round(hwm_kb / 1024, 1),
    }


# entry point


def summary(result: dict[str, Any]) -> str:
    """A few human-readable lines for stderr."""
    head = f"timerd bench {result['shape']} n={result['n']} (children log at {result['log_level']})"
    if result["shape"] == "backlog":
        return (
            f"{head}\n  due timer fired {result['fired_s_after_start']} s after the daemon"
            f" started (due at +1 s); daemon RSS {result['rss_mb']} MB, peak {result['hwm_mb']} MB"
        )
    before = "finished" if result["created_before_due"] else "NOT finished"
    return (
        f"{head}\n  created {result['created']} at {result['creates_per_s']}/s, {before}"
        f" {result['creation_done_s_before_due']} s before the first due time"
        f"\n  fired {result.get('fires_per_s')}/s; late ms p50 {result.get('late_ms_p50')}"
        f" p99 {result.get('late_ms_p99')} max {result.get('late_ms_max')};"
        f" lost {result['lost']}, duplicates {result['duplicates']}"
    )


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # so SIGTERM, like Ctrl-C, stops the children on the way out


def run_bench(args: argparse.Namespace) -> None:
    """`timerd bench`: run one shape, print its JSON line and a summary."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        opts = options(args)
        result = run_backlog(opts) if opts.shape == "backlog" else run_firing(opts)
    except BenchError as exc:
        print(f"timerd bench: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except KeyboardInterrupt:
        print("timerd bench: interrupted; its processes are stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result), flush=True)
    print(summary(result), file=sys.stderr)
