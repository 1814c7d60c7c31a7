"""`timerd status`: what a store holds and who fires it, for a terminal."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from timerd.lease import live_daemons
from timerd.models import Lease, State, Timer
from timerd.store import Store

RECENT = 200  # fired timers whose lateness `status` summarises


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """One live daemon: the partitions it holds and how fast it fired of late."""

    holder: str
    partitions: list[int]
    recent_fires: int  # of the newest RECENT fired timers, how many it fired
    fires_per_s: float  # over the span those took


CALLBACKS_CAP = 1000  # failure callbacks due that `status` counts, at most


@dataclass(frozen=True, slots=True)
class Report:
    """A snapshot of one store."""

    store_url: str
    partitions: int
    daemons: list[DaemonStatus]
    counts: dict[State, int]
    series: int  # recurring timers live: pending, firing or paused
    callbacks_due: int  # failure callbacks due now (pending), counted up to CALLBACKS_CAP
    next_due_at_ms: int | None
    recent_late_ms: list[int]


def take_report(store: Store, store_url: str, now_ms: int) -> Report:
    """Read everything `status` shows, in a handful of queries."""
    fired = [t for t in store.list_timers(State.FIRED, None, RECENT) if t.fired_at_ms]
    late = sorted(t.fired_at_ms - t.due_at_ms for t in fired if t.fired_at_ms is not None)
    return Report(
        store_url,
        store.partitions(),
        _daemons(store.leases(), fired, now_ms),
        store.count_by_state(),
        store.count_series(),
        len(store.callbacks_due(now_ms + 1, CALLBACKS_CAP)),
        store.next_due_at_ms(),
        late,
    )


def _daemons(leases: list[Lease], fired: list[Timer], now_ms: int) -> list[DaemonStatus]:
    span_s = _span_s(fired)
    return [
        DaemonStatus(
            holder,
            partitions,
            fires := sum(t.fired_by == holder for t in fired),
            fires / span_s if span_s else 0.0,
        )
        for holder, partitions in live_daemons(leases, now_ms).items()
    ]


def _span_s(fired: list[Timer]) -> float:
    moments = [t.fired_at_ms for t in fired if t.fired_at_ms is not None]
    return (max(moments) - min(moments)) / 1000 if len(moments) > 1 else 0.0


def render(report: Report, now_ms: int) -> str:
    """The report as aligned lines of text."""
    held = sum(len(d.partitions) for d in report.daemons)
    lines = [
        f"store:        {redact_url(report.store_url)}",
        f"daemons:      {len(report.daemons)} live, {held} of {report.partitions} partitions held",
    ]
    lines += [f"  {_daemon(d)}" for d in report.daemons]
    counts = ", ".join(f"{s.value} {report.counts.get(s, 0)}" for s in State)
    lines.append(f"timers:       {counts}")
    lines.append(f"series:       {report.series} recurring live (pending, firing or paused)")
    due = report.callbacks_due
    shown = f"{CALLBACKS_CAP}+" if due >= CALLBACKS_CAP else str(due)
    lines.append(f"callbacks:    {shown} failure callbacks due now")
    lines.append(f"next due:     {_next_due(report.next_due_at_ms, now_ms)}")
    lines.append(f"lateness:     {_lateness(report.recent_late_ms)}")
    return "\n".join(lines)


def _daemon(daemon: DaemonStatus) -> str:
    return (
        f"{daemon.holder} holds {len(daemon.partitions)} partitions ({_ranges(daemon.partitions)});"
        f" fired {daemon.recent_fires} of the last {RECENT}, {daemon.fires_per_s:.1f}/s"
    )


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def redact_url(url: str) -> str:
    """Hide a password in a MongoDB URL."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest.split("/", 1)[0]:
        return url
    creds, _, host = rest.partition("@")
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def _next_due(next_due_at_ms: int | None, now_ms: int) -> str:
    if next_due_at_ms is None:
        return "nothing pending"
    delta_s = (next_due_at_ms - now_ms) / 1000
    return f"overdue by {-delta_s:.1f} s" if delta_s < 0 else f"in {delta_s:.1f} s"


def _lateness(late_ms: list[int]) -> str:
    if not late_ms:
        return "no timer fired yet"
    p99 = late_ms[min(len(late_ms) - 1, int(len(late_ms) * 0.99))]
    median = statistics.median(late_ms)
    return f"last {len(late_ms)} fired: p50 {median:g} ms, p99 {p99} ms, max {late_ms[-1]} ms"
