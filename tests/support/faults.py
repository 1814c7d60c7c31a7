"""Helpers for the real-process fault suite (tests/faults, run by `bash scripts/faults`).

- `TimerStream`: a client thread creating timers at a steady rate through a real `timerd api`,
  each to its own path on one receiver, recording every 201 (id and due time).
- `WriteLock`: an outside process holding the SQLite file's write lock until released.
- `tally`: what a receiver got against what was acknowledged (lost, early, duplicates).
- `Leases`, `holder`, `claimed_by`, `fired_by`, `taken_over`, `shared`: who holds which of the
  partitions (the `leases` table, read straight from the SQLite file), which daemon a process
  is, and what a daemon has claimed or fired.
- `report`: each test's one-line summary, printed and appended as a JSON line to
  `$TIMERD_FAULTS_REPORT` (default `.faults/fault-report.jsonl`); `python -m
  tests.support.faults REPORT` prints those lines as the table RELIABILITY.md shows.
"""

from __future__ import annotations

import json
import os
import random
import select
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx

from tests.support.cluster import ids_in, now_ms, rfc3339
from tests.support.procs import TimerdProcess
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until
from timerd.models import MEMBER_PREFIX

PARTITIONS = 64  # of a store created by this build (the `meta` table says so; asserted)

REPORT_ENV = "TIMERD_FAULTS_REPORT"
DEFAULT_REPORT = Path(__file__).resolve().parents[2] / ".faults" / "fault-report.jsonl"


class TimerStream:
    """Creates one timer every `every_s` seconds, due `ahead_s` (a random span) after it is
    sent, until stopped or `limit` were sent. Timer n goes to `<hook_url>/s<n>`. `acked()` is
    every id answered 201 with its due time; anything else is counted in `refused`."""

    def __init__(
        self,
        api_url: str,
        hook_url: str,
        *,
        every_s: float,
        ahead_s: tuple[float, float] = (0.5, 3.0),
        limit: int = 5000,
        seed: int = 9,
    ) -> None:
        self.api_url = api_url
        self.hook_url = hook_url
        self.every_s = every_s
        self.ahead_s = ahead_s
        self.limit = limit
        self.refused: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._acked: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="timer-stream", daemon=True)

    def __enter__(self) -> TimerStream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def acked(self) -> dict[str, int]:
        with self._lock:
            return dict(self._acked)

    def stop(self) -> dict[str, int]:
        """Stop creating; return every acknowledged timer (id → due ms)."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the timer stream did not stop"
        if self._error is not None:
            raise AssertionError("the timer stream failed") from self._error
        return self.acked()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.api_url, timeout=5.0) as client:
                next_s = time.monotonic()
                for n in range(self.limit):
                    # The pace of the workload, not a wait for anything to happen.
                    if self._stop.wait(max(0.0, next_s - time.monotonic())):
                        return
                    next_s += self.every_s
                    self._create(client, n)
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def _create(self, client: httpx.Client, n: int) -> None:
        due_ms = now_ms() + int(self._rng.uniform(*self.ahead_s) * 1000)
        body = {"url": f"{self.hook_url}/s{n}", "fire_at": rfc3339(due_ms)}
        try:
            answer = client.post("/timers", json=body)
        except httpx.TransportError as exc:
            self.refused[type(exc).__name__] += 1
            return
        if answer.status_code != 201:
            self.refused[str(answer.status_code)] += 1
            return
        with self._lock:
            self._acked[answer.json()["id"]] = due_ms


_LOCK_SCRIPT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")  # the write lock (in WAL mode EXCLUSIVE takes the same lock)
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


class WriteLock:
    """Another process holding the SQLite file's write lock, as a backup tool, a migration or a
    stray `sqlite3` shell would: `BEGIN IMMEDIATE` on its own connection. In WAL mode readers
    go on; every writer waits its busy timeout and then fails "database is locked". Held from
    `with` until `release()`."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.locked_ms = 0
        self.released_ms = 0
        self._popen: subprocess.Popen[str] | None = None

    def __enter__(self) -> WriteLock:
        self._popen = subprocess.Popen(
            [sys.executable, "-c", _LOCK_SCRIPT, str(self.db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "locked"
        self.locked_ms = now_ms()
        return self

    def release(self) -> None:
        popen = self._running()
        assert popen.stdin is not None
        popen.stdin.write("\n")
        popen.stdin.flush()
        assert self._line() == "released"
        self.released_ms = now_ms()
        assert popen.wait(timeout=10) == 0

    def __exit__(self, *_: object) -> None:
        popen = self._running()
        if popen.poll() is None:
            popen.kill()
        popen.wait(timeout=10)
        for pipe in (popen.stdin, popen.stdout):
            if pipe is not None:
                pipe.close()

    def _running(self) -> subprocess.Popen[str]:
        assert self._popen is not None
        return self._popen

    def _line(self, timeout_s: float = 10.0) -> str:
        out: IO[str] | None = self._running().stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout_s)
        assert ready, f"the lock holder said nothing within {timeout_s}s"
        return out.readline().strip()


@dataclass
class Tally:
    """What arrived against what was acknowledged."""

    timers: int
    lost: set[str]
    early: list[tuple[str, int]]  # (id, ms before its due time)
    duplicates: set[str]  # ids that arrived more than once
    deliveries: int

    @property
    def duplicate_deliveries(self) -> int:
        return self.deliveries - (self.timers - len(self.lost))


def tally(due: dict[str, int], arrivals: Sequence[Arrival]) -> Tally:
    """Count `arrivals` of the timers in `due` (id → due ms); other arrivals are ignored."""
    mine = [a for a in arrivals if a.timer_id in due]
    counts = ids_in(mine)
    return Tally(
        timers=len(due),
        lost=set(due) - set(counts),
        early=[(a.timer_id, due[a.timer_id] - a.at_ms) for a in mine if a.at_ms < due[a.timer_id]],
        duplicates={i for i, n in counts.items() if n > 1},
        deliveries=len(mine),
    )


def arrived_all(ids: Iterable[str], arrivals: Sequence[Arrival]) -> bool:
    return set(ids) <= {a.timer_id for a in arrivals}


def arrived_within(timeout_s: float, ids: set[str], *receivers: Receiver) -> bool:
    """Whether every id arrived at one of `receivers` within `timeout_s` (the test reports
    what is missing itself, with the figures)."""
    try:
        wait_until(
            lambda: arrived_all(ids, [a for r in receivers for a in r.arrivals]),
            timeout_s,
            "every timer",
        )
    except AssertionError:
        return False
    return True


def logged(proc: TimerdProcess, event: str) -> list[dict[str, Any]]:
    """Every JSON log line of `proc` for `event`, each with its timestamp as `at_ms`."""
    found = []
    for line in proc.stderr().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == event:
            moment = datetime.fromisoformat(entry["timestamp"])
            found.append({**entry, "at_ms": round(moment.timestamp() * 1000)})
    return found


def holder(proc: TimerdProcess) -> str:
    """A daemon's holder name (`host:pid:suffix`), from its `daemon_started` log line."""
    [event] = wait_until(lambda: logged(proc, "daemon_started"), 10, "daemon_started")
    name: str = event["holder"]
    return name


def _query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Rows of a read on the SQLite file, on a connection of its own (WAL readers never wait
    for the daemons' writes)."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(sql, params).fetchall()


@dataclass(frozen=True)
class Leases:
    """The live leases in the store at one read: partition → holder, and the live members."""

    partitions: dict[int, str]
    members: set[str]

    def of(self, name: str) -> set[int]:
        return {p for p, h in self.partitions.items() if h == name}

    def by_holder(self) -> dict[str, set[int]]:
        found: dict[str, set[int]] = {}
        for partition, name in self.partitions.items():
            found.setdefault(name, set()).add(partition)
        return found


def leases(db: Path) -> Leases:
    """Every lease not expired now (the store's clock is this host's for SQLite)."""
    rows = _query(db, "SELECT name, holder, expires_at_ms FROM leases")
    now = now_ms()
    live = [(name, who) for name, who, expires in rows if expires > now]
    return Leases(
        partitions={int(n[1:]): w for n, w in live if n.startswith("p") and n[1:].isdigit()},
        members={w for n, w in live if n.startswith(MEMBER_PREFIX)},
    )


def store_partitions(db: Path) -> int:
    [(count,)] = _query(db, "SELECT value FROM meta WHERE name = 'partitions'")
    return int(count)


def shared(db: Path, names: Iterable[str]) -> Leases | None:
    """The leases once every partition is held by one of `names` and each of them holds at
    least one (the daemons have shared the partitions out), else None."""
    now = leases(db)
    names = set(names)
    by_holder = now.by_holder()
    full = len(now.partitions) == PARTITIONS and set(by_holder) <= names
    return now if full and names <= set(by_holder) else None


def taken_over(db: Path, partitions: set[int], gone: str) -> bool:
    """Whether each of `partitions` is held (a live lease) by a daemon other than `gone`."""
    held = leases(db).partitions
    return all(held.get(p) not in (None, gone) for p in partitions)


def claimed_by(db: Path, name: str) -> set[str]:
    """The timers `name` has claimed and not settled (`firing`, `claimed_by` it)."""
    rows = _query(db, "SELECT id FROM timers WHERE state = 'firing' AND claimed_by = ?", [name])
    return {timer_id for (timer_id,) in rows}


def fired_by(db: Path) -> dict[str, str | None]:
    """Every fired timer's `fired_by` (the daemon whose outcome write was accepted)."""
    return dict(_query(db, "SELECT id, fired_by FROM timers WHERE state = 'fired'"))


def gauges_agree(procs: Sequence[TimerdProcess], names: Sequence[str], db: Path) -> str:
    """Empty when each daemon's `timerd_partitions_held` is what the `leases` table says it holds
    and its `timerd_leader` is 1 exactly when that is not 0; else what differs."""
    held = leases(db).by_holder()
    wrong = []
    for proc, name in zip(procs, names, strict=True):
        count = len(held.get(name, ()))
        seen = (gauge(proc, "timerd_partitions_held"), gauge(proc, "timerd_leader"))
        if seen != (float(count), float(count > 0)):
            wrong.append(f"{name}: gauges (held, leader)={seen}, leases table {count}")
    return "; ".join(wrong)


def settled_gauges(procs: Sequence[TimerdProcess], names: Sequence[str], db: Path) -> str:
    """What still differs between the daemons' gauges and the leases table after waiting
    (bounded) for them to agree (a hand-over may be under way); "" once they do."""
    wrong = ""

    def agree() -> bool:
        nonlocal wrong
        wrong = gauges_agree(procs, names, db)
        return not wrong

    wait_quietly(agree, 5)
    return wrong


def wait_quietly(check: Callable[[], object], timeout_s: float) -> bool:
    """`wait_until` that answers False instead of failing (the test reports it as a figure)."""
    try:
        wait_until(check, timeout_s, "a check")
    except AssertionError:
        return False
    return True


def gauge(proc: TimerdProcess, name: str) -> float | None:
    """A gauge's value on the process's `/metrics`, or None when it cannot be read."""
    try:
        text = httpx.get(f"{proc.base_url}/metrics", timeout=2.0).text
    except httpx.TransportError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def spread(values_ms: Sequence[int]) -> str:
    """min/median/max, or "-" when there is nothing."""
    if not values_ms:
        return "-"
    return f"{min(values_ms)}/{round(statistics.median(values_ms))}/{max(values_ms)}"


@dataclass
class Figures:
    """One test's figures: the report line and the JSON record."""

    test: str
    timers: int
    faults: str
    lost: int
    duplicates: int
    early: int
    takeover_ms: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "FAIL: " + "; ".join(self.problems) if self.problems else "ok"
        parts = [
            f"timers={self.timers}",
            f"faults={self.faults}",
            f"lost={self.lost}",
            f"duplicates={self.duplicates}",
            f"early={self.early}",
            f"takeover_ms(min/med/max)={spread(self.takeover_ms)}",
            *(f"{k}={v}" for k, v in self.extra.items()),
        ]
        return f"FAULTS {self.test}: {', '.join(parts)} -> {verdict}"


def report(figures: Figures) -> None:
    """Print the one-line summary and append the JSON record to the report file."""
    print("\n" + figures.line(), flush=True)
    path = Path(os.environ.get(REPORT_ENV) or DEFAULT_REPORT)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**figures.__dict__, "takeover_ms": figures.takeover_ms, "at_ms": now_ms()}
    with path.open("a") as sink:
        sink.write(json.dumps(record) + "\n")


def table(records: list[dict[str, Any]]) -> str:
    """The report as a Markdown table."""
    rows = [
        "| test | timers | faults injected | lost | duplicates | early "
        "| takeover ms (min/median/max) | other | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        other = ", ".join(f"{k}={v}" for k, v in r["extra"].items())
        result = "FAIL: " + "; ".join(r["problems"]) if r["problems"] else "pass"
        rows.append(
            f"| {r['test']} | {r['timers']} | {r['faults']} | {r['lost']} | {r['duplicates']} "
            f"| {r['early']} | {spread(r['takeover_ms'])} | {other} | {result} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else os.environ.get(REPORT_ENV) or DEFAULT_REPORT)
    if not path.exists():
        print(f"no fault report at {path}")
        return 1
    print(table([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
