"""The end-of-run invariants: what must hold after the quiet phase, whatever the faults were.

Deliveries are judged against the ledger (what receivers saw, on the true clock) and the store
(what the daemons recorded). A second, overlapping delivery of one timer is allowed only when one
of the daemons involved was killed or stalled around it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from tests.sim.receivers import MARKER, Delivery
from timerd.models import HISTORY_MAX, State, Timer

if TYPE_CHECKING:
    from tests.sim.world import Disruption, World

FINAL = frozenset({State.FIRED, State.FAILED, State.CANCELLED})


def check_final(world: World) -> None:
    """Check every end-of-run invariant; record each violation in `world.violations`."""
    timers = {t.id: t for t in world.all_timers()}
    now_ms = world.true.now_ms()
    for problem in _acknowledged(world, timers, now_ms):
        world.violate(problem)
    for timer in timers.values():
        for problem in _timer(world, timer, now_ms):
            world.violate(problem)
    for problem in _overlaps(world, now_ms):
        world.violate(problem)
    for actor in world.actors:
        if actor.alive and any(vars_of(actor.daemon.counters()).values()):
            world.violate(
                f"{actor.name}: not idle after the quiet phase: {actor.daemon.counters()}"
            )


def vars_of(counters: object) -> dict[str, int]:
    names = getattr(counters, "__slots__", ()) or vars(counters)
    return {name: getattr(counters, name) for name in names}


def _acknowledged(world: World, timers: dict[str, Timer], now_ms: int) -> list[str]:
    """Every acknowledged timer exists and is final, or pending with a future attempt."""
    assert world.api is not None
    problems = []
    for timer_id in world.api.log.acked:
        timer = timers.get(timer_id)
        if timer is None:
            problems.append(f"acknowledged timer {timer_id} is lost")
        elif timer.state is State.PENDING and timer.due_at_ms <= now_ms:
            problems.append(f"{_name(timer)} still pending, due {now_ms - timer.due_at_ms} ms ago")
        elif timer.state not in FINAL and timer.state is not State.PENDING:
            problems.append(f"{_name(timer)} is still {timer.state} after the quiet phase")
    for timer_id in world.api.log.cancel_acked:
        timer = timers[timer_id]
        if timer.state is not State.CANCELLED:
            problems.append(f"{_name(timer)}: cancel acknowledged, but it is {timer.state}")
    return problems


def _timer(world: World, timer: Timer, now_ms: int) -> list[str]:
    deliveries = world.ledger.by_timer.get(timer.id, [])
    problems = []
    budget = timer.max_attempts or world.budget
    if timer.attempts > budget:
        problems.append(f"{_name(timer)}: {timer.attempts} attempts, budget {budget}")
    if len(deliveries) > timer.attempts:
        problems.append(
            f"{_name(timer)}: {len(deliveries)} deliveries, but {timer.attempts} attempts"
            f" claimed: {_list(deliveries)}"
        )
    if timer.state is State.FIRED and not any(d.delivered for d in deliveries):
        problems.append(f"{_name(timer)} is fired but no receiver answered 2xx")
    if timer.state is not State.FIRED:
        problems += [
            f"{_name(timer)} is {timer.state} although {d.describe()} answered 2xx"
            for d in deliveries
            if d.delivered and not _disrupted(world, d)
        ]
    cancelled_at = world.api.log.cancel_applied.get(timer.id) if world.api else None
    if cancelled_at is not None:
        problems += [
            f"{_name(timer)} delivered after its cancel landed at {cancelled_at}: {d.describe()}"
            for d in deliveries
            if d.start_ms > cancelled_at
        ]
    problems += _history(world, timer, deliveries)
    return problems


def _history(world: World, timer: Timer, deliveries: list[Delivery]) -> list[str]:
    """The history agrees with the ledger: no record without a delivery, none twice, and
    every delivery of an undisturbed daemon recorded."""
    by_seq = {d.seq: d for d in deliveries}
    problems = []
    seen: Counter[str] = Counter()
    for record in timer.history:
        if record.response and record.response.startswith(MARKER):
            seen[record.response] += 1
            d = by_seq.get(int(record.response.removeprefix(MARKER)))
            if d is None or d.status != record.status:
                problems.append(f"{_name(timer)}: history {record} matches no delivery")
        elif record.error:
            seen[f"error:{record.error}"] += 1
    problems += [
        f"{_name(timer)}: {marker} recorded {n} times"
        for marker, n in seen.items()
        if n > 1 and marker.startswith(MARKER)
    ]
    if len(timer.history) >= HISTORY_MAX:
        return problems  # older records were dropped: absence proves nothing
    wanted: Counter[str] = Counter()
    for d in deliveries:
        if _disrupted(world, d) or d.kind == "cancelled":
            continue
        if d.status is not None:
            wanted[d.marker] += 1
        else:
            wanted[f"error:{d.raised or d.error}"] += 1
    problems += [
        f"{_name(timer)}: {n} undisturbed deliveries {key} but {seen[key]} recorded"
        f" ({_list(deliveries)})"
        for key, n in wanted.items()
        if seen[key] < n
    ]
    return problems


def _overlaps(world: World, now_ms: int) -> list[str]:
    problems = []
    claim_ms = world.settings.claim_ttl_ms
    for deliveries in world.ledger.by_timer.values():
        for i, first in enumerate(deliveries):
            for second in deliveries[i + 1 :]:
                if not first.overlaps(second, now_ms):
                    continue
                window = (
                    first.start_ms - claim_ms,
                    max(second.end_ms or now_ms, first.end_ms or now_ms),
                )
                if not any(_hit(world, d.actor, window) for d in (first, second)):
                    problems.append(
                        f"overlapping deliveries without a kill or stall: {first.describe()}"
                        f" and {second.describe()}"
                    )
    return problems


def _hit(world: World, actor: str, window: tuple[int, int]) -> bool:
    return any(d.actor == actor and _intersects(d, window) for d in world.disruptions)


def _intersects(d: Disruption, window: tuple[int, int]) -> bool:
    end = d.end_ms if d.end_ms is not None else 2**62
    return d.start_ms <= window[1] and window[0] <= end


def _disrupted(world: World, d: Delivery) -> bool:
    """Whether the delivering daemon was killed or stalled from this delivery's claim on."""
    window = (d.start_ms - world.settings.claim_ttl_ms, 2**62)
    return _hit(world, d.actor, window)


def _name(timer: Timer) -> str:
    return f"timer {timer.id} ({timer.state}, attempts {timer.attempts})"


def _list(deliveries: list[Delivery]) -> str:
    return "; ".join(d.describe() for d in deliveries)
