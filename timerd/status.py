"""`timerd status`: what a store holds and who fires it, for a terminal."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from timerd.models import Lease, State
from timerd.store import Store

RECENT = 200  # fired timers whose lateness `status` summarises


@dataclass(frozen=True, slots=True)
class Report:
    """A snapshot of one store."""

    store_url: str
    lease: Lease | None
    counts: dict[State, int]
    next_due_at_ms: int | None
    recent_late_ms: list[int]


def take_report(store: Store, store_url: str) -> Report:
    """Read everything `status` shows, in a handful of queries."""
    fired = store.list_timers(State.FIRED, None, RECENT)
    late = sorted(t.fired_at_ms - t.due_at_ms for t in fired if t.fired_at_ms is not None)
    return Report(
        store_url, store.get_lease(), store.count_by_state(), store.next_due_at_ms(), late
    )


def render(report: Report, now_ms: int) -> str:
    """The report as aligned lines of text."""
    lines = [
        f"store:        {redact_url(report.store_url)}",
        f"leader:       {_leader(report, now_ms)}",
    ]
    counts = ", ".join(f"{s.value} {report.counts.get(s, 0)}" for s in State)
    lines.append(f"timers:       {counts}")
    lines.append(f"next due:     {_next_due(report.next_due_at_ms, now_ms)}")
    lines.append(f"lateness:     {_lateness(report.recent_late_ms)}")
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """Hide a password in a MongoDB URL."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest.split("/", 1)[0]:
        return url
    creds, _, host = rest.partition("@")
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def _leader(report: Report, now_ms: int) -> str:
    lease = report.lease
    if lease is None:
        return "none yet"
    if lease.expires_at_ms < now_ms:
        return f"none (the lease of {lease.holder}, epoch {lease.epoch}, has expired)"
    left_s = (lease.expires_at_ms - now_ms) / 1000
    return f"{lease.holder}, epoch {lease.epoch}, lease valid for {left_s:.1f} s"


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
