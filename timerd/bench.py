"""`timerd bench`: how fast timerd creates and fires timers on this machine, over loopback.

    timerd bench --shape burst   --n 20000              # every timer due at one instant
    timerd bench --shape burst   --n 20000 --workers 2  # … fired by two processes
    timerd bench --shape spread  --n 20000 --rate 1000  # due evenly, `rate` per second
    timerd bench --shape backlog --n 1000000            # memory and start-up over a big backlog
    timerd bench --shape store-scale --n 1000000        # hot store calls over 1M finished timers
    timerd bench --shape create  --n 5000               # creates/s next to a bare endpoint; batches
    timerd bench --shape fire-cpu --n 20000             # CPU per fire, part by part

Burst and spread start, as child processes, a raw-asyncio HTTP receiver (on uvloop), one
`timerd api` and one `timerd daemon` (random free ports, a temporary SQLite file unless --store is
given; the daemon runs --workers firing processes, by default its own default: one per core), create
the timers through the API from --clients concurrent clients with absolute `fire_at` times, each
with a URL of its own (`…/hooks/<n>`; --same-url for one URL), and wait for them to arrive. Then, in
the same run, they run `ceiling.py --uvloop` of the same shape (--ceiling; `none` skips it) and
report timerd's fires/s as a ratio of the ceiling's. Backlog writes N pending timers due a day from
now straight into the SQLite file, plus one due a second after the daemon starts, starts only the
daemon, and reports when that timer arrived and the daemon's resident memory. Store-scale writes N
finished timers and --pending pending ones over a few tenants through the store's `insert_many`,
then times the store calls on the hot paths (--repeat times each) and the same through a
`timerd api` process over HTTP. Create measures one `timerd api`'s creates/s next to a bare
Starlette endpoint's in the same run, and its timers/s through `POST /timers/batch`
(`timerd.bench_create`). Fire-cpu measures the CPU a fire takes in the daemon, in timerd's delivery
and in a bare aiohttp post, apart (`timerd.bench_cpu`).

Prints one JSON line with every figure on stdout and a short summary on stderr. Children log at
the daemon's default level (info) unless --log-level or TIMERD_LOG_LEVEL says otherwise; the
output says which. Other `TIMERD_*` variables in the environment reach them unchanged. Every
child and temporary file is removed at the end.

A benchmark, not a test: the suite runs it only at a tiny size, to check that it works.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import http.client
import json
import multiprocessing
import os
import secrets
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
import uvloop

from timerd.lease import owners
from timerd.models import (
    MEMBER_PREFIX,
    AttemptRecord,
    State,
    Timer,
    new_timer_id,
    partition_lease,
)
from timerd.settings import Settings
from timerd.store import open_store
from timerd.store.base import Store
from timerd.store.sqlite import SqliteStore
from timerd.workers import worker_count

T = TypeVar("T")
Arrival = tuple[str, float]  # (timer id from the path, arrival time in epoch seconds)

HOOK_PATH = "/hooks"  # the receiver's: `/hooks/<n>/<id>`, or `/hooks/<id>` with --same-url
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
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CEILING = "../shared/bench/ceiling.py"  # relative to the repository's root
CEILING_TIMEOUT_S = 600.0
SHAPES = ("burst", "spread", "backlog", "store-scale", "create", "fire-cpu")
STORE_SCALE_REPEAT = 200


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
    log_level: str | None  # None: the children's default (info) or TIMERD_LOG_LEVEL
    lead_s: float | None
    margin_s: float | None
    workers: int | None = None  # None: the daemon's default (TIMERD_WORKERS, else `worker_count`)
    same_url: bool = False
    ceiling: str = DEFAULT_CEILING
    pending: int = 10_000
    repeat: int | None = None  # None: the shape's own (STORE_SCALE_REPEAT, bench_cpu's rounds)

    @property
    def margin(self) -> float:
        """How long after the last due instant the run waits for stragglers."""
        return self.margin_s if self.margin_s is not None else 10 + self.n / 1000


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `timerd bench`."""
    parser.add_argument("--shape", choices=SHAPES, default="burst")
    parser.add_argument(
        "--n", type=int, default=20_000, help="how many timers (store-scale: finished timers)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="timers/s due for spread")
    parser.add_argument("--clients", type=int, default=64, help="concurrent create requests")
    parser.add_argument(
        "--store",
        help="store URL (default: a temporary SQLite file); store-scale reuses a file that"
        " already holds timers instead of building it",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="of the children (default: theirs, info, or TIMERD_LOG_LEVEL)",
    )
    parser.add_argument("--lead-s", type=float, help="seconds from creation start to the due time")
    parser.add_argument("--margin-s", type=float, help="wait this long past the last due time")
    parser.add_argument(
        "--workers",
        type=int,
        help="firing processes of the daemon, as TIMERD_WORKERS (default: the daemon's, one per"
        " core)",
    )
    parser.add_argument(
        "--same-url", action="store_true", help="one URL for every timer (default: one each)"
    )
    parser.add_argument(
        "--ceiling",
        default=DEFAULT_CEILING,
        help="ceiling.py to run after burst and spread (relative paths from the repository's"
        f" root; default {DEFAULT_CEILING}); none: skip it",
    )
    parser.add_argument(
        "--pending", type=int, default=10_000, help="store-scale: pending timers besides the N"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"store-scale: timed calls of each kind (default {STORE_SCALE_REPEAT});"
        " fire-cpu: rounds (default 5)",
    )


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
        workers=args.workers,
        same_url=args.same_url,
        ceiling=args.ceiling,
        pending=args.pending,
        repeat=args.repeat,
    )
    least_n = 0 if opts.shape in ("backlog", "store-scale") else 1
    if opts.n < least_n or opts.rate <= 0 or opts.clients < 1:
        raise BenchError("--n, --rate and --clients must be positive")
    if opts.workers is not None and opts.workers < 0:
        raise BenchError("--workers must not be negative (0: the daemon's default)")
    if opts.pending < 0 or (opts.repeat is not None and opts.repeat < 1):
        raise BenchError("--pending must not be negative, --repeat must be positive")
    file_shape = opts.shape in ("backlog", "store-scale")
    if file_shape and opts.store and not opts.store.startswith("sqlite:"):
        raise BenchError(f"the {opts.shape} shape writes a SQLite file: give a sqlite:/// URL")
    return opts


def log_level(opts: Options) -> tuple[str, str]:
    """The children's log level and where it comes from."""
    if opts.log_level:
        return opts.log_level, "--log-level"
    if os.environ.get("TIMERD_LOG_LEVEL"):
        return os.environ["TIMERD_LOG_LEVEL"], "TIMERD_LOG_LEVEL"
    return Settings().log_level, "default"


def workers(opts: Options) -> tuple[int, str]:
    """How many firing processes the daemon runs, and where that comes from."""
    if opts.workers is not None:
        setting, source = opts.workers, "--workers"
    elif os.environ.get("TIMERD_WORKERS"):
        setting, source = int(os.environ["TIMERD_WORKERS"]), "TIMERD_WORKERS"
    else:
        setting, source = Settings().workers, "default"
    return worker_count(dataclasses.replace(Settings(), workers=setting)), source


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fire_at(ms: int) -> str:
    """Epoch milliseconds as the RFC 3339 `fire_at` the API takes, exact to the millisecond."""
    moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds")


# the receiver: a child process that records arrivals and answers 200


class _HookProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1: records `(id, arrival)` for each `POST /hooks/[<n>/]<id>` (the id is
    the last segment: the one timerd appends), answers 200."""

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
                timer_id = path.split("?")[0].rsplit("/", 1)[1]
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
    # On uvloop: a seventh less CPU than asyncio's loop, CPU the firing processes share with
    # it (ceiling.py's receiver has a core of its own: what it costs, the ceiling never feels).
    uvloop.run(_serve_hooks(conn))


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
        env.update(TIMERD_STORE=self.store_url, TIMERD_HOST="127.0.0.1")
        if self.opts.log_level:
            env["TIMERD_LOG_LEVEL"] = self.opts.log_level
        if self.opts.workers is not None:
            env["TIMERD_WORKERS"] = str(self.opts.workers)
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


def settled_holders(store: Store, members_expected: int) -> dict[str, int] | None:
    """Partitions per holder once `members_expected` daemons are live and every partition is
    leased to the one rendezvous hashing gives it (the share they keep); None before that."""
    now = now_ms()
    leases = {lease.name: lease for lease in store.leases() if lease.expires_at_ms > now}
    members = [name[len(MEMBER_PREFIX) :] for name in leases if name.startswith(MEMBER_PREFIX)]
    if len(members) != members_expected:
        return None
    held: Counter[str] = Counter()
    for partition, owner in enumerate(owners(store.partitions(), members)):
        lease = leases.get(partition_lease(partition))
        if lease is None or lease.holder != owner:
            return None
        held[lease.holder] += 1
    return dict(held)


def wait_for_partitions(store_url: str, daemon: Child, members: int) -> dict[str, int]:
    """Wait until the daemon's `members` firing processes hold their shares of the partitions;
    return how many each holds."""
    store = open_store(store_url)
    try:
        held: dict[str, int] | None = None

        def settled() -> bool:
            nonlocal held
            held = settled_holders(store, members)
            return held is not None

        wait_until(settled, daemon, f"{members} firing process(es) to share the partitions")
        assert held is not None
        return held
    finally:
        store.close()


def process_children(pid: int) -> list[int]:
    """The child processes of `pid` (the daemon's workers), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in children.read_text().split()]
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def state_counts(sqlite_path: str) -> dict[str, int]:
    """How many timers the store holds in each state (read after the children stopped)."""
    with contextlib.closing(sqlite3.connect(sqlite_path)) as conn:
        rows = conn.execute("SELECT state, COUNT(*) FROM timers GROUP BY state").fetchall()
    return {str(state): int(count) for state, count in rows}


def fired_by_counts(sqlite_path: str) -> list[int]:
    """How many timers each firing process delivered, most first (after the children stopped)."""
    with contextlib.closing(sqlite3.connect(sqlite_path)) as conn:
        rows = conn.execute(
            "SELECT COUNT(*) FROM timers WHERE state = 'fired' GROUP BY fired_by"
        ).fetchall()
    return sorted((int(count) for (count,) in rows), reverse=True)


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

    def __init__(
        self, session: aiohttp.ClientSession, port: int, hook_url: str, same_url: bool
    ) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.hook_url = hook_url
        self.same_url = same_url
        self.created: dict[str, int] = {}  # timer id -> due time (epoch ms)
        self.errors: Counter[str] = Counter()

    async def create(self, item: tuple[str, int]) -> None:
        """Create the timer `(label, due time)`: its URL is `…/hooks/<label>` (as real clients
        give each timer a URL of its own), or `…/hooks` for all with --same-url."""
        label, due_ms = item
        url = self.hook_url if self.same_url else f"{self.hook_url}/{label}"
        body = {"url": url, "fire_at": fire_at(due_ms)}
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
    items = [(f"c{i}", due) for i in range(count)]
    await for_each(items, opts.clients, started + 120, api.create)
    rate = max(len(api.created), 1) / (time.monotonic() - started)
    # cancels are single autocommit writes: 64 at once make some wait out SQLite's busy timeout
    await for_each(list(api.created), CANCEL_CLIENTS, time.monotonic() + 120, api.cancel)
    api.created.clear()
    return rate, min(300.0, 3 + 1.5 * opts.n / rate)


def due_times(opts: Options, t_ms: int) -> Iterator[tuple[str, int]]:
    """`(label, due time)` of each timer to create."""
    if opts.shape == "burst":
        return ((str(i), t_ms) for i in range(opts.n))
    return ((str(i), t_ms + round(i * 1000 / opts.rate)) for i in range(opts.n))


async def create_timers(opts: Options, api_port: int, hook_url: str) -> Creation:
    """Create the N timers due at T = start + lead; no create starts after T."""
    connector = aiohttp.TCPConnector(limit=opts.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        api = ApiClient(session, api_port, hook_url, opts.same_url)
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


def start_api_and_daemon(lab: Lab, members: int) -> tuple[int, Child, dict[str, int]]:
    """Start the API, then the daemon; wait until its `members` firing processes hold their
    shares of the partitions (returned: partitions per holder)."""
    if lab.temp_store:
        SqliteStore(lab.sqlite_path()).close()  # the schema, before two processes race for it
    port = free_port()
    api = lab.start("api", port)
    wait_until(lambda: healthz_ok(port), api, "the API's /healthz")
    daemon = lab.start("daemon")
    held = wait_for_partitions(lab.store_url, daemon, members)
    return port, daemon, held


def run_firing(opts: Options) -> dict[str, Any]:
    """The burst and spread shapes, then the ceiling of the same shape."""
    members, _ = workers(opts)
    with Lab(opts) as lab:
        receiver = lab.start_receiver()
        api_port, daemon, held = start_api_and_daemon(lab, members)
        pids = {name: child.proc.pid for name, child in lab.children.items()}
        if members > 1:  # the daemon is the parent of its firing processes
            children = process_children(daemon.proc.pid)
            pids |= {f"worker{i}": pid for i, pid in enumerate(sorted(children))}
        meter = CpuMeter(pids | {"receiver": receiver.process.pid or 0})
        creation = asyncio.run(create_timers(opts, api_port, receiver.url))
        cpu_create = meter.lap()
        last_due_s = creation.due_at_s + (0 if opts.shape == "burst" else opts.n / opts.rate)
        arrivals = wait_for_arrivals(receiver, len(creation.due_ms), last_due_s + opts.margin)
        cpu_fire = meter.lap()
        daemon.check_alive()
        creates = creation_figures(creation, opts)
        floor = {} if ceiling_path(opts) is None else floor_of(lab, opts, creates["creates_per_s"])
        lab.stop()
        states = state_counts(lab.sqlite_path()) if lab.temp_store else None
        fired_by = fired_by_counts(lab.sqlite_path()) if lab.temp_store else None
    result = {
        **run_header(opts, lab),
        "partitions_held": sorted(held.values(), reverse=True),
        **creates,
        **floor,
        **firing_figures(opts.shape, creation, arrivals),
        "states": states,
        "fired_by_process": fired_by,
        "cpu_s_create": cpu_create,
        "cpu_s_fire": cpu_fire,
    }
    return result | ceiling_figures(opts, result.get("fires_per_s"))


def run_header(opts: Options, lab: Lab) -> dict[str, Any]:
    header: dict[str, Any] = {"shape": opts.shape, "n": opts.n}
    if opts.shape == "spread":
        header["rate"] = opts.rate
    if opts.shape in ("burst", "spread", "create"):
        header["clients"] = opts.clients
        header["urls"] = "one" if opts.same_url else "one per timer"
    if opts.shape not in ("store-scale", "create"):
        header["workers"], header["workers_from"] = workers(opts)
    store = "temporary sqlite" if lab.temp_store else opts.store
    level, level_from = log_level(opts)
    return header | {
        "store": store,
        "log_level": level,
        "log_level_from": level_from,
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
    }


# the ceiling: ceiling.py of the same shape, run right after timerd's


def ceiling_path(opts: Options) -> Path | None:
    """The ceiling script (relative paths from the repository's root); None to skip it."""
    if opts.ceiling.lower() == "none":
        return None
    path = Path(opts.ceiling)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def run_ceiling(opts: Options, script: Path) -> dict[str, Any]:
    """Run `ceiling.py --uvloop` of the run's shape and size; return its JSON line."""
    command = [sys.executable, str(script), "--uvloop", "--shape", opts.shape, "--n", str(opts.n)]
    if opts.shape == "spread":
        command += ["--rate", str(opts.rate)]
    try:
        done = subprocess.run(  # noqa: S603 -- the ceiling script the user pointed at
            command, capture_output=True, timeout=CEILING_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{script} ran longer than {CEILING_TIMEOUT_S:.0f} s") from None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{script} exited with {done.returncode}: {' / '.join(tail)}")
    try:
        return cast(dict[str, Any], json.loads(lines[-1]))
    except json.JSONDecodeError:
        raise BenchError(f"{script} printed no JSON line: {lines[-1][:200]}") from None


def ceiling_figures(opts: Options, fires_per_s: float | None) -> dict[str, Any]:
    """The ceiling's figures next to timerd's, and timerd's fires/s as a ratio of its."""
    script = ceiling_path(opts)
    if script is None:
        return {"ceiling": None}
    if not script.exists():
        raise BenchError(f"no ceiling script at {script} (--ceiling PATH, or none to skip it)")
    ceiling = run_ceiling(opts, script)
    figures: dict[str, Any] = {"ceiling": ceiling | {"script": str(script)}}
    ceiling_rate = ceiling.get("fires_per_s")
    if opts.shape == "burst" and fires_per_s and ceiling_rate:
        figures["ratio_to_ceiling"] = round(fires_per_s / ceiling_rate, 3)
    return figures


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
        firing = process_children(pid) if workers(opts)[0] > 1 else []
        firing_kb = [(memory_kb(p, "VmRSS"), memory_kb(p, "VmHWM")) for p in firing]
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
        "workers_rss_hwm_mb": [[round(r / 1024, 1), round(h / 1024, 1)] for r, h in firing_kb],
    }


# store-scale: the hot store calls over millions of finished timers

SCALE_CHUNK = 20_000  # timers per insert_many (one transaction), so memory stays bounded
SCALE_TENANTS = ("", "acme", "globex", "initech")  # "": the tenant of requests without keys
FINISHED_TENANT_OF = (0, 0, 0, 0, 1, 1, 1, 2, 2, 3)  # by i % 10: 40, 30, 20, 10 %
PENDING_TENANT_OF = (0,) * 12 + (1,) * 4 + (2,) * 3 + (3,)  # by i % 20: 60, 20, 15, 5 %
DAY_MS = 86_400_000
SCALE_SPAN_MS = 6 * DAY_MS  # finished timers were created over the six days before the build
RECENT_MS = 3_600_000  # pending timers were created over the last hour, due within a day
FAILED_ATTEMPTS = 5
SCALE_PARTITION_SHARE = 2  # the due poll is timed for one of two firing processes' partitions
PROGRESS_EVERY = 1_000_000  # rows between progress lines on stderr while building


class IdMaker:
    """ObjectId-shaped ids (4 bytes of seconds, 5 random bytes, a 3-byte counter) for a given
    creation time, so timers created days ago sort (and list) as they would have."""

    def __init__(self) -> None:
        self._random = secrets.token_hex(5)
        self._counter = secrets.randbelow(1 << 24)

    def __call__(self, created_ms: int) -> str:
        self._counter = (self._counter + 1) % (1 << 24)
        return f"{created_ms // 1000:08x}{self._random}{self._counter:06x}"


def scrambled(i: int) -> int:
    """`i` hashed (Knuth's multiplicative hash), so that kind, key and tenant, all taken from
    `i`, do not move together."""
    return (i * 2_654_435_761) % (1 << 32)


def finished_kind(i: int) -> State:
    """The final state of the `i`-th finished timer: 90 % fired, 7 % failed, 3 % cancelled."""
    kind = scrambled(i) % 100
    return State.FIRED if kind < 90 else State.FAILED if kind < 97 else State.CANCELLED


def finished_keyed(i: int) -> bool:
    """Whether the `i`-th finished timer was created with an idempotency key (half are)."""
    return scrambled(i) >> 16 & 1 == 0


def finished_timer(i: int, created_ms: int, new_id: IdMaker) -> Timer:
    """The `i`-th finished timer, as the daemon leaves one (`finished_kind`): fired (one in eight
    on a second attempt), failed after five attempts, or cancelled; half with an idempotency
    key; its own URL and payload; its tenant `FINISHED_TENANT_OF[i % 10]`."""
    due_ms = created_ms + 1000 + (i % 3600) * 1000
    kind = finished_kind(i)
    keyed = finished_keyed(i)
    timer = Timer(
        id=new_id(created_ms),
        url=f"https://hooks.example.com/orders/{i}",
        due_at_ms=due_ms,
        created_at_ms=created_ms,
        payload=f'{{"order":{i},"kind":"reminder"}}',
        tenant=SCALE_TENANTS[FINISHED_TENANT_OF[i % 10]],
        idempotency_key=f"order-{i}" if keyed else None,
        request_hash=f"{i:064x}" if keyed else None,
    )
    if kind is State.CANCELLED:
        return dataclasses.replace(timer, state=State.CANCELLED, finished_at_ms=created_ms + 500)
    if kind is State.FAILED:
        history = tuple(
            AttemptRecord(a, due_ms + (a - 1) * 5000 + 3, 30.0, 503, None, "busy")
            for a in range(1, FAILED_ATTEMPTS + 1)
        )
        return dataclasses.replace(
            timer,
            state=State.FAILED,
            attempts=FAILED_ATTEMPTS,
            last_status=503,
            history=history,
            finished_at_ms=history[-1].at_ms,
        )
    first = AttemptRecord(1, due_ms + 3, 4.2, 200, None, "ok")
    if scrambled(i) >> 8 & 7 == 0:
        first = AttemptRecord(1, due_ms + 3, 30.0, 503, None, "busy")
        history = (first, AttemptRecord(2, due_ms + 5003, 4.2, 200, None, "ok"))
    else:
        history = (first,)
    return dataclasses.replace(
        timer,
        state=State.FIRED,
        attempts=len(history),
        fired_at_ms=history[-1].at_ms,
        finished_at_ms=history[-1].at_ms,
        fired_by=f"bench-host:{4242 + i % 2}:0badc0de",
        last_status=200,
        history=history,
    )


def pending_timer(j: int, pending: int, now: int, new_id: IdMaker) -> Timer:
    """The `j`-th of `pending` timers: created in the last hour, due over the next day."""
    created_ms = now - RECENT_MS + j * RECENT_MS // max(pending, 1)
    keyed = j % 2 == 0
    return Timer(
        id=new_id(created_ms),
        url=f"https://hooks.example.com/orders/p{j}",
        due_at_ms=now + 600_000 + j * DAY_MS // max(pending, 1),
        created_at_ms=created_ms,
        payload=f'{{"order":"p{j}","kind":"reminder"}}',
        tenant=SCALE_TENANTS[PENDING_TENANT_OF[j % 20]],
        idempotency_key=f"pending-{j}" if keyed else None,
        request_hash=f"{j:064x}" if keyed else None,
    )


def build_scale_store(path: str, n: int, pending: int) -> float:
    """Write `n` finished and `pending` pending timers through the store's own `insert_many`,
    a chunk per transaction (durability off: a scratch file); return seconds."""
    started = time.monotonic()
    store = SqliteStore(path, synchronous="OFF")
    try:
        now, new_id = now_ms(), IdMaker()
        first_ms = now - SCALE_SPAN_MS - 60_000
        for lo in range(0, n, SCALE_CHUNK):
            store.insert_many(
                [
                    finished_timer(i, first_ms + i * SCALE_SPAN_MS // n, new_id)
                    for i in range(lo, min(n, lo + SCALE_CHUNK))
                ]
            )
            if (lo + SCALE_CHUNK) % PROGRESS_EVERY == 0:
                done = lo + SCALE_CHUNK
                took = time.monotonic() - started
                print(f"timerd bench: {done:,} of {n:,} finished timers ({took:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
        for lo in range(0, pending, SCALE_CHUNK):
            chunk = range(lo, min(pending, lo + SCALE_CHUNK))
            store.insert_many([pending_timer(j, pending, now, new_id) for j in chunk])
    finally:
        store.close()
    return time.monotonic() - started


def holds_timers(path: str) -> bool:
    """Whether the SQLite file exists with timers in it already (a store-scale file to reuse)."""
    if not Path(path).exists():
        return False
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            return conn.execute("SELECT 1 FROM timers LIMIT 1").fetchone() is not None
        except sqlite3.OperationalError:
            return False


def timings(call: Callable[[], object], repeat: int) -> dict[str, float]:
    """Milliseconds of `repeat` calls: the first, min, median, p99 and max."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    first = times[0]
    times.sort()
    return {
        "first": round(first, 3),
        "min": round(times[0], 3),
        "median": round(percentile(times, 50), 3),
        "p99": round(percentile(times, 99), 3),
        "max": round(times[-1], 3),
    }


def keyed_finished(n: int, tenant_index: int) -> str | None:
    """The idempotency key of the newest finished timer of that tenant that has one."""
    for i in range(n - 1, max(n - 1000, -1), -1):
        if finished_keyed(i) and FINISHED_TENANT_OF[i % 10] == tenant_index:
            return f"order-{i}"
    return None


def time_store_calls(store: Store, n: int, repeat: int) -> dict[str, Any]:
    """The store calls of the hot paths, each timed `repeat` times, on the store as the API
    and the daemon open it."""
    cap = Settings().max_pending_per_tenant
    many, few = SCALE_TENANTS[0], SCALE_TENANTS[3]  # the tenants with most and fewest timers
    share = store.partitions() // SCALE_PARTITION_SHARE
    half = list(range(share))
    batch = Settings().batch_size
    now = now_ms()
    newest = store.list_timers(None, None, 1, many)
    newest_s = int(newest[0].id[:8], 16) if newest else now // 1000
    deep = f"{newest_s - SCALE_SPAN_MS // 2000:08x}{'f' * 16}"  # a cursor three days back
    key = keyed_finished(n, 1) or "pending-12"
    calls: dict[str, Callable[[], object]] = {
        "metrics": lambda: (store.count_active(), store.next_due_at_ms()),
        "cap_check": lambda: store.count_pending(many, cap),
        "cap_check_few": lambda: store.count_pending(few, cap),
        "cap_check_at_1000": lambda: store.count_pending(many, 1000),
        "list": lambda: store.list_timers(None, None, 50, many),
        "list_deep": lambda: store.list_timers(None, deep, 50, many),
        "list_fired": lambda: store.list_timers(State.FIRED, None, 50, many),
        "list_failed": lambda: store.list_timers(State.FAILED, None, 50, many),
        "list_failed_few": lambda: store.list_timers(State.FAILED, None, 50, few),
        "due_poll_idle": lambda: store.pending_due(now + 5000, batch, None, half),
        "due_poll_page": lambda: store.pending_due(now + 2 * DAY_MS, batch, None, half),
        "idempotency_hit": lambda: store.find_by_idempotency_key(SCALE_TENANTS[1], key),
        "idempotency_miss": lambda: store.find_by_idempotency_key(SCALE_TENANTS[1], "none"),
    }
    checks = {
        "pending": store.count_active()[State.PENDING],
        "cap_check_counted": store.count_pending(many, cap),
        "list_rows": len(store.list_timers(None, None, 50, many)),
        "list_deep_rows": len(store.list_timers(None, deep, 50, many)),
        "list_failed_rows": len(store.list_timers(State.FAILED, None, 50, many)),
        "due_poll_page_rows": len(store.pending_due(now + 2 * DAY_MS, batch, None, half)),
        "idempotency_hit_found": store.find_by_idempotency_key(SCALE_TENANTS[1], key) is not None,
    }
    return {"store_checks": checks} | {
        "store_ms": {name: timings(call, repeat) for name, call in calls.items()}
    }


def time_http_calls(port: int, repeat: int) -> dict[str, Any]:
    """GET /metrics and list pages through a `timerd api` process, one keep-alive connection,
    one request at a time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    paths = {
        "metrics": "/metrics",
        "list": "/timers?limit=50",
        "list_failed": "/timers?limit=50&state=failed",
    }
    try:
        bodies: dict[str, bytes] = {}

        def get(name: str) -> None:
            conn.request("GET", paths[name])
            response = conn.getresponse()
            bodies[name] = response.read()
            if response.status != 200:
                raise BenchError(f"GET {paths[name]} answered {response.status}")

        figures = {name: timings(functools.partial(get, name), repeat) for name in paths}
    finally:
        conn.close()
    return {
        "http_checks": {
            "list_rows": len(json.loads(bodies["list"])["timers"]),
            "metrics_has_timers": b"timerd_timers{" in bodies["metrics"],
        },
        "http_ms": figures,
    }


def db_mb(path: str) -> float:
    """The SQLite file with its -wal and -shm, in MB."""
    files = Path(path).parent.glob(Path(path).name + "*")
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


def run_store_scale(opts: Options) -> dict[str, Any]:
    """The store-scale shape: build (or reuse) the file, time the store calls in this process,
    then the same reads through a `timerd api` process."""
    repeat = opts.repeat or STORE_SCALE_REPEAT
    with Lab(opts) as lab:
        path = lab.sqlite_path()
        reuse = not lab.temp_store and holds_timers(path)
        build_s = None if reuse else build_scale_store(path, opts.n, opts.pending)
        store = SqliteStore(path)  # as the API opens it
        try:
            rows = {} if build_s is not None else {"counted": store.count_by_state()}
            figures = time_store_calls(store, opts.n, repeat)
        finally:
            store.close()
        port = free_port()
        api = lab.start("api", port)
        wait_until(lambda: healthz_ok(port), api, "the API's /healthz")
        figures |= time_http_calls(port, repeat)
        api.check_alive()
        size = db_mb(path)
    return {
        **run_header(opts, lab),
        "pending": opts.pending,
        "tenants": len(SCALE_TENANTS),
        "repeat": repeat,
        "built": build_s is not None,
        **{key: {str(s): c for s, c in value.items()} for key, value in rows.items()},
        "build_s": build_s and round(build_s, 1),
        "rows_per_s": build_s and round((opts.n + opts.pending) / max(build_s, 1e-9)),
        "db_mb": size,
        **figures,
    }


# entry point


def summary(result: dict[str, Any]) -> str:
    """A few human-readable lines for stderr."""
    if result["shape"] == "fire-cpu":
        from timerd.bench_cpu import fire_cpu_summary  # noqa: PLC0415 -- as run_create

        return fire_cpu_summary(result)
    head = (
        f"timerd bench {result['shape']} n={result['n']}"
        f" (children log at {result['log_level']}, from {result['log_level_from']}"
    )
    if "workers" in result:
        head += f"; {result['workers']} firing process(es), from {result['workers_from']}"
    head += ")"
    if result["shape"] == "backlog":
        return (
            f"{head}\n  due timer fired {result['fired_s_after_start']} s after the daemon"
            f" started (due at +1 s); daemon RSS {result['rss_mb']} MB, peak {result['hwm_mb']} MB"
        )
    if result["shape"] == "create":
        return create_summary(head, result)
    if result["shape"] == "store-scale":
        lines = [f"{head}, {result['pending']} pending, {result['db_mb']} MB"]
        for where in ("store_ms", "http_ms"):
            for name, ms in result[where].items():
                lines.append(
                    f"  {where[:-3]:5} {name:18} median {ms['median']:8.3f} ms"
                    f"  p99 {ms['p99']:8.3f} ms"
                )
        return "\n".join(lines)
    if result.get("ratio_to_ceiling") is not None:
        ceiling = (
            f"; ceiling.py --uvloop {result['ceiling']['fires_per_s']}/s:"
            f" ratio {result['ratio_to_ceiling']}"
        )
    else:
        ceiling = ""
    before = "finished" if result["created_before_due"] else "NOT finished"
    floor = result.get("floor")
    to_floor = (
        f" (floor {floor['creates_per_s']}/s: ratio {result['create_ratio_to_floor']})"
        if floor
        else ""
    )
    return (
        f"{head}\n  created {result['created']} at {result['creates_per_s']}/s{to_floor}, {before}"
        f" {result['creation_done_s_before_due']} s before the first due time"
        f"\n  fired {result.get('fires_per_s')}/s; late ms p50 {result.get('late_ms_p50')}"
        f" p99 {result.get('late_ms_p99')} max {result.get('late_ms_max')};"
        f" lost {result['lost']}, duplicates {result['duplicates']}, early"
        f" {result.get('early')}{ceiling}"
    )


def run_create(opts: Options) -> dict[str, Any]:
    """The create shape (`timerd.bench_create`, which builds on this module)."""
    from timerd.bench_create import run_create as run  # noqa: PLC0415 -- it imports this module

    return run(opts)


def run_fire_cpu(opts: Options) -> dict[str, Any]:
    """The fire-cpu shape (`timerd.bench_cpu`, which builds on this module)."""
    from timerd.bench_cpu import run_fire_cpu as run  # noqa: PLC0415 -- it imports this module

    return run(opts)


def floor_of(lab: Lab, opts: Options, creates_per_s: int) -> dict[str, Any]:
    """The floor next to a firing run's creates (`timerd.bench_create.floor_figures`)."""
    from timerd.bench_create import floor_figures  # noqa: PLC0415 -- as run_create

    return floor_figures(lab, opts, creates_per_s)


def create_summary(head: str, result: dict[str, Any]) -> str:
    """The create shape's summary lines (`timerd.bench_create`)."""
    from timerd.bench_create import create_summary as lines  # noqa: PLC0415 -- as run_create

    return lines(head, result)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # so SIGTERM, like Ctrl-C, stops the children on the way out


def run_bench(args: argparse.Namespace) -> None:
    """`timerd bench`: run one shape, print its JSON line and a summary."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        opts = options(args)
        runs = {
            "backlog": run_backlog,
            "store-scale": run_store_scale,
            "create": run_create,
            "fire-cpu": run_fire_cpu,
        }
        result = runs.get(opts.shape, run_firing)(opts)
    except BenchError as exc:
        print(f"timerd bench: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    except KeyboardInterrupt:
        print("timerd bench: interrupted; its processes are stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(result), flush=True)
    print(summary(result), file=sys.stderr)
