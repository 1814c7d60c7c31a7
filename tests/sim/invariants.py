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
from timerd.store.base import CLAIM_EXPIRED

if TYPE_CHECKING:
    from tests.sim.world import Disruption, World

FINAL = frozenset({State.FIRED, State.FAILED, State.CANCELLED})
STAMP_TOLERANCE_MS = 1000  # how far an attempt's recorded time may be from the true one
RETRY_AFTER_TOLERANCE_MS = 1000  # HTTP dates have whole seconds
QUIET_LATENESS_S = 2.0  # beyond a poll interval, once the quiet world has one stable leader


def check_final(world: World) -> None:
    """Check every end-of-run invariant; record each violation in `world.violations`."""
    timers = {t.id: t for t in world.all_timers()}
    now_ms = world.true.now_ms()
    for problem in _acknowledged(world, timers, now_ms):
        world.violate(problem)
    for timer in timers.values():
        for problem in _timer(world, timer, now_ms):
            world.violate(problem)
    for problem in _duplicates(world, now_ms):
        world.violate(problem)
    for problem in _quiet_lateness(world):
        world.violate(problem)
    for problem in _late_claims(world):
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
    problems += _expired_claims(world, timer)
    problems += _stamps(timer, deliveries)
    problems += _retry_after(world, timer, deliveries)
    return problems


def _expired_claims(world: World, timer: Timer) -> list[str]:
    """A claim expires only when its owner died or stalled (or crashed): the sweep counts it
    as a failed attempt, so an expiry nobody caused would spend a live claim's budget."""
    s = world.settings
    lookback_ms = s.claim_ttl_ms + int(3 * s.lease_ttl_s * 1000)
    problems = []
    for record in timer.history:
        window = (record.at_ms - lookback_ms, record.at_ms)
        if record.error == CLAIM_EXPIRED and not any(
            _intersects(d, window) for d in world.disruptions
        ):
            problems.append(
                f"{_name(timer)}: claim expired at {record.at_ms} with no daemon killed or"
                f" stalled in the {lookback_ms} ms before"
            )
    return problems


def _stamps(timer: Timer, deliveries: list[Delivery]) -> list[str]:
    """Recorded attempt times and `fired_at_ms` are true times (the store's clock), not a
    skewed host's: `fired_at_ms - due_at_ms` is the lateness users read."""
    by_marker = {d.marker: d for d in deliveries}
    problems = []
    for record in timer.history:
        d = by_marker.get(record.response or "")
        if d is not None and abs(record.at_ms - d.start_ms) > STAMP_TOLERANCE_MS:
            problems.append(
                f"{_name(timer)}: attempt {record.attempt} recorded at {record.at_ms}, but"
                f" {d.describe()} started {record.at_ms - d.start_ms:+} ms from that"
            )
    fired_at = timer.fired_at_ms
    if fired_at is not None and not any(
        d.delivered and abs(fired_at - d.start_ms) <= STAMP_TOLERANCE_MS for d in deliveries
    ):
        problems.append(
            f"{_name(timer)}: fired_at_ms {fired_at} matches no 2xx delivery ({_list(deliveries)})"
        )
    return problems


def _retry_after(world: World, timer: Timer, deliveries: list[Delivery]) -> list[str]:
    """A valid Retry-After is honoured: the next attempt starts no sooner, unless the timer
    was moved meanwhile or its daemon was disturbed."""
    assert world.api is not None
    moves = world.api.log.moves_applied.get(timer.id, [])
    problems = []
    for d in deliveries:
        if d.not_before_ms is None or d.end_ms is None or _disrupted(world, d):
            continue
        later = [n for n in deliveries if n.start_ms > d.end_ms]
        if not later:
            continue
        after = min(later, key=lambda n: n.start_ms)
        moved = any(d.end_ms <= m <= after.start_ms for m in moves)
        if not moved and after.start_ms + RETRY_AFTER_TOLERANCE_MS < d.not_before_ms:
            problems.append(
                f"{_name(timer)}: retried {d.not_before_ms - after.start_ms} ms before the"
                f" Retry-After of {d.describe()}: {after.describe()}"
            )
    return problems


def _late_claims(world: World) -> list[str]:
    """A claim that came back too late to cover a delivery's timeouts is released, not fired
    (unless the process stopped after it had decided to fire: then it was in flight)."""
    s = world.settings
    needed_ms = int((s.delivery_timeout_s + s.connect_timeout_s) * 1000)
    return [
        f"fired a claim with {d.claimed_until_ms - d.start_ms} ms left, {needed_ms} needed:"
        f" {d.describe()}"
        for d in world.ledger.deliveries
        if d.claimed_until_ms is not None
        and d.start_ms > d.claimed_until_ms - needed_ms + STAMP_TOLERANCE_MS
        and not _in_flight_disruption(world, d, d.start_ms)
    ]


def _quiet_lateness(world: World) -> list[str]:
    """Once the quiet world has had time to settle on its leaders and sweep what the dead
    left, a timer due fires within about a poll interval of its due time."""
    if world.quiet_since_ms is None:
        return []
    s = world.settings
    stable_ms = world.quiet_since_ms + int((2 * s.lease_ttl_s + s.claim_ttl_ms / 1000) * 1000)
    bound_ms = int((s.poll_interval_s + QUIET_LATENESS_S) * 1000)
    return [
        f"late by {d.start_ms - d.due_at_ms} ms in the quiet phase: {d.describe()}"
        for d in world.ledger.deliveries
        if d.due_at_ms >= stable_ms and d.start_ms - d.due_at_ms > bound_ms
    ]


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


def _duplicates(world: World, now_ms: int) -> list[str]:
    """A timer is delivered again, after a 2xx or while a delivery of it is in flight, only when
    a daemon was killed or stalled while a delivery was in flight: the first one, from the
    moment its daemon learnt of its claim until its outcome could have been written, or the
    second one, between its daemon learning of its claim and the request going out."""
    problems = []
    for deliveries in world.ledger.by_timer.values():
        ordered = sorted(deliveries, key=lambda d: (d.start_ms, d.seq))
        for i, first in enumerate(ordered):
            for second in ordered[i + 1 :]:
                overlapping = first.overlaps(second, now_ms)
                if not (overlapping or first.delivered):
                    continue
                claim_ms = world.settings.claim_ttl_ms
                first_end = (first.end_ms or now_ms) + claim_ms
                if _in_flight_disruption(world, first, first_end) or _in_flight_disruption(
                    world, second, second.start_ms
                ):
                    continue
                what = "overlapping deliveries" if overlapping else "delivered again after 2xx"
                problems.append(
                    f"{what} without a kill or stall in flight: {first.describe()}"
                    f" and {second.describe()}"
                )
    return problems


def _in_flight_disruption(world: World, d: Delivery, until_ms: int) -> bool:
    """Whether `d`'s daemon was killed or stopped (the kill or stall began) after learning of
    the claim and by `until_ms`."""
    seen_ms = world.claims_seen.get((d.timer_id, d.attempt, d.actor))
    since_ms = seen_ms if seen_ms is not None and seen_ms <= d.start_ms else d.start_ms
    return any(x.actor == d.actor and since_ms <= x.start_ms <= until_ms for x in world.disruptions)


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
