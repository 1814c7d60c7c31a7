"""The domain rules every backend shares, written once over a few primitives per engine.

`BaseStore` implements the parts of the `Store` contract that are rules rather than queries:
which states each change applies in (cancel, pause, resume, replay, update), which error a
failed conditional write means (`TimerNotFound` or `TimerStateConflict`, and in which state),
what a malformed id or another tenant's timer reads as, the list filters and the URL scan's
cursor, and what an insert refused for its idempotency key returns. The adapters (`sqlite.py`,
`mongo.py`) implement the primitives below in their engine's terms and, as they are, every
query the daemon's hot paths run (claims, outcomes, due polls).

Changes are passed to the primitives as `Timer` field names and values as a `Timer` holds them
(`State`s, header tuples); each adapter's codec turns them into columns or document fields.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from timerd.errors import TimerNotFound, TimerStateConflict
from timerd.models import State, Timer, TimerChanges, is_timer_id
from timerd.store.base import Store


@dataclass(frozen=True, slots=True)
class InState:
    """The states a conditional write applies in: any timer in one of `states`, and a series
    (a timer with a `schedule`) also in one of `series_states`."""

    states: tuple[State, ...]
    series_states: tuple[State, ...] = ()

    @property
    def series_only(self) -> bool:
        """Whether only series can match (a one-off timer then reads as missing)."""
        return not self.states and bool(self.series_states)


CANCELLABLE = InState((State.PENDING,), series_states=(State.PAUSED, State.FIRING))
CHANGEABLE = InState((State.PENDING,), series_states=(State.PAUSED,))
PAUSABLE = InState((), series_states=(State.PENDING,))
RESUMABLE = InState((State.PAUSED,))
REPLAYABLE = InState((State.FAILED, State.FIRED))


@dataclass(frozen=True, slots=True)
class TimerFilter:
    """Which timers a listing covers; None leaves a condition out. Listings go newest first."""

    tenant: str | None = None
    state: State | None = None
    before_id: str | None = None  # only ids below it: the cursor of the next page
    recurring: bool | None = None  # only series (True), only one-off timers (False)


def key_holder(timer: Timer, find: Callable[[str, str], Timer | None]) -> Timer | None:
    """What an insert of `timer` refused by the store returns: the tenant's timer that holds its
    idempotency key, looked up with `find(tenant, key)`. None when it has no key or nobody holds
    it: the insert was then refused for something else, which is a bug the caller raises."""
    if timer.idempotency_key is None:
        return None
    return find(timer.tenant, timer.idempotency_key)


def changes_of(changes: TimerChanges) -> dict[str, Any]:
    """The fields `update_pending` sets: those `changes` gives, and for a new schedule also its
    first occurrence's time, with a fresh retry budget."""
    given: dict[str, Any] = {
        "due_at_ms": changes.due_at_ms,
        "url": changes.url,
        "payload": changes.payload,
        "headers": changes.headers,
        "schedule": changes.schedule,
        "on_failure_url": changes.on_failure_url,
    }
    values = {name: value for name, value in given.items() if value is not None}
    if changes.schedule is not None:
        values |= {"occurrence_at_ms": changes.due_at_ms, "attempts": 0}
    return values


class BaseStore(Store):
    """A `Store` whose rules are written here; subclasses supply the engine's primitives."""

    # primitives

    @abc.abstractmethod
    def _find(self, timer_id: str) -> Timer | None:
        """The timer with this (well-formed) id, of any tenant, or None."""

    @abc.abstractmethod
    def _update_if(
        self, timer_id: str, tenant: str | None, when: InState, values: Mapping[str, Any]
    ) -> Timer | None:
        """In one conditional write, set `values` on the timer with this (well-formed) id if it
        matches `when` and is `tenant`'s (any tenant's when None); return it as it now is
        (unchanged when `values` is empty), or None when it does not match or does not exist."""

    @abc.abstractmethod
    def _list(self, where: TimerFilter, limit: int) -> list[Timer]:
        """Up to `limit` (at least 1) timers matching `where`, newest first."""

    @abc.abstractmethod
    def _scan_by_url(
        self, url_prefix: str, where: TimerFilter, limit: int, scan: int
    ) -> tuple[list[Timer], str | None]:
        """Up to `limit` (at least 1) timers whose URL starts with `url_prefix`, newest first,
        among the `scan` newest matching `where`, and the oldest id of those `scan` (None when
        fewer are left)."""

    # rules

    def get(self, timer_id: str, tenant: str | None = None) -> Timer:
        timer = self._find(timer_id) if is_timer_id(timer_id) else None
        if timer is None or (tenant is not None and timer.tenant != tenant):
            raise TimerNotFound(timer_id)
        return timer

    def cancel(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        values = {
            "state": State.CANCELLED,
            "finished_at_ms": now_ms,
            "claimed_by": None,
            "claimed_until_ms": None,
            "claim_token": None,
        }
        return self._change(timer_id, tenant, CANCELLABLE, values)

    def update_pending(
        self, timer_id: str, changes: TimerChanges, tenant: str | None = None
    ) -> Timer:
        return self._change(timer_id, tenant, CHANGEABLE, changes_of(changes))

    def pause(self, timer_id: str, tenant: str | None = None) -> Timer:
        return self._change(timer_id, tenant, PAUSABLE, {"state": State.PAUSED, "attempts": 0})

    def resume(self, timer_id: str, due_at_ms: int, tenant: str | None = None) -> Timer:
        values = {"state": State.PENDING, "due_at_ms": due_at_ms, "occurrence_at_ms": due_at_ms}
        return self._change(timer_id, tenant, RESUMABLE, values)

    def replay(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        values = {
            "state": State.PENDING,
            "due_at_ms": now_ms,
            "attempts": 0,
            "finished_at_ms": None,
        }
        return self._change(timer_id, tenant, REPLAYABLE, values)

    def _change(
        self, timer_id: str, tenant: str | None, when: InState, values: Mapping[str, Any]
    ) -> Timer:
        """Set `values` on the timer if it matches `when`; otherwise raise what that means:
        `TimerNotFound` (also for a one-off timer where only series apply) or
        `TimerStateConflict` with the state the timer is in."""
        if not is_timer_id(timer_id):
            raise TimerNotFound(timer_id)
        changed = self._update_if(timer_id, tenant, when, values)
        if changed is not None:
            return changed
        timer = self.get(timer_id, tenant)
        if when.series_only and not timer.recurring:
            raise TimerNotFound(timer_id)
        raise TimerStateConflict(timer_id, timer.state.value)

    def list_timers(
        self,
        state: State | None,
        before_id: str | None,
        limit: int,
        tenant: str | None = None,
        recurring: bool | None = None,
    ) -> list[Timer]:
        if limit <= 0:
            return []
        return self._list(TimerFilter(tenant, state, before_id, recurring), limit)

    def list_timers_by_url(
        self,
        url_prefix: str,
        state: State | None,
        before_id: str | None,
        limit: int,
        *,
        tenant: str | None,
        scan: int,
    ) -> tuple[list[Timer], str | None]:
        if limit <= 0:
            return [], None
        where = TimerFilter(tenant, state, before_id)
        timers, edge_id = self._scan_by_url(url_prefix, where, limit, max(scan, 1))
        return timers, timers[-1].id if len(timers) == limit else edge_id
