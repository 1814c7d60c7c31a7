"""The store contract shared by the API and the daemon.

Both adapters (`sqlite.py`, `mongo.py`) implement `Store` exactly as documented here, and
`tests/test_store_contract.py` holds them to it. All methods are synchronous and thread-safe: the
API calls them from Starlette's thread pool, the daemon from thread pools of its own, or on its
event loop inside `nonblocking()` where the store offers it; the one exception,
`insert_many_async`, is the API's create path on the event loop.

Time is always passed in (`now_ms`, UTC epoch milliseconds); no method reads the clock.
Every state change is a single conditional write. A write that matches nothing means another
process got there first; methods report that in their return value, never by raising.
Any method may raise `StoreUnavailable` when the store cannot be reached or stays locked.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from contextlib import AbstractContextManager

from timerd.models import (
    ApiKey,
    CallbackOutcome,
    Claim,
    Due,
    Lease,
    Outcome,
    State,
    Timer,
    TimerChanges,
)

CLAIM_EXPIRED = "claim_expired"  # the error of an attempt whose claim expired unreported


class Store(abc.ABC):
    """Durable home of timers and of the leases that share their partitions out."""

    @abc.abstractmethod
    def partitions(self) -> int:
        """How many partitions the timer space has: fixed when the store was created. A timer
        is in partition `models.partition_of(id, partitions)`."""

    @abc.abstractmethod
    def insert(self, timer: Timer) -> Timer:
        """Store a new timer durably; return only once it survives a crash (and power loss where
        the store is configured for it). Concurrent inserts may share one commit.

        Returns `timer`, or, when it has an `idempotency_key` that another timer of the same
        tenant already has, that other timer, unchanged (nothing is inserted): the caller then
        compares `request_hash`. Of concurrent inserts with one key, exactly one is inserted.
        """

    @abc.abstractmethod
    def insert_many(self, timers: Sequence[Timer]) -> list[Timer]:
        """Insert each of `timers` as `insert` would, in one durable write (one transaction on
        SQLite); return, in order, what `insert` would have returned for each."""

    async def insert_many_async(self, timers: Sequence[Timer]) -> list[Timer]:
        """`insert_many` for a caller on an event loop, which it does not block. This default
        runs it in a worker thread; an adapter with a writer thread of its own resolves an
        asyncio future from that thread instead, with no thread hop per call."""
        return await asyncio.to_thread(self.insert_many, timers)

    @abc.abstractmethod
    def find_by_idempotency_key(self, tenant: str, key: str) -> Timer | None:
        """The tenant's timer created with this idempotency key, or None."""

    @abc.abstractmethod
    def get(self, timer_id: str, tenant: str | None = None) -> Timer:
        """Return the timer with this id. Raises `TimerNotFound`, also for a malformed id and,
        when `tenant` is given, for a timer of another tenant.

        Every method that takes `tenant` treats another tenant's timer exactly as a missing one.
        """

    @abc.abstractmethod
    def cancel(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        """Move a `pending` timer, or a series (a timer with a `schedule`) that is `paused` or
        `firing`, to `cancelled` (finished at `now_ms`, claim cleared) and return it as it now
        is. The outcome of a series' delivery in flight then no longer applies: the series ends.

        Raises `TimerNotFound` for an unknown id, and `TimerStateConflict` (changing nothing)
        when the timer is in any other state.
        """

    @abc.abstractmethod
    def update_pending(
        self, timer_id: str, changes: TimerChanges, tenant: str | None = None
    ) -> Timer:
        """Apply `changes` to a `pending` timer (or a `paused` series) in one conditional write
        and return it as it now is; a timer the daemon has claimed is no longer pending, so the
        two never both win. A new `schedule` also makes `due_at_ms` the current occurrence's
        time (`occurrence_at_ms`) and resets `attempts` to 0.

        Raises `TimerNotFound` for an unknown id, `TimerStateConflict` (changing nothing) in any
        other state.
        """

    @abc.abstractmethod
    def pause(self, timer_id: str, tenant: str | None = None) -> Timer:
        """Move a `pending` series to `paused` (no longer due; its attempts reset to 0) and
        return it as it now is. Raises `TimerNotFound` for an unknown id or a one-off timer's,
        `TimerStateConflict` (changing nothing) in any other state."""

    @abc.abstractmethod
    def resume(self, timer_id: str, due_at_ms: int, tenant: str | None = None) -> Timer:
        """Move a `paused` series back to `pending`, its current occurrence scheduled and due
        at `due_at_ms`, and return it as it now is. Raises `TimerNotFound` for an unknown id,
        `TimerStateConflict` (changing nothing) in any other state."""

    @abc.abstractmethod
    def count_pending(self, tenant: str, limit: int) -> int:
        """How many `pending` timers `tenant` has, counting no further than `limit` (the
        per-tenant cap: the cost stays bounded by the cap, whatever the tenant has)."""

    @abc.abstractmethod
    def pending_due(
        self,
        before_ms: int,
        limit: int,
        after: tuple[int, str] | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[Due]:
        """Read, without claiming, up to `limit` `pending` timers with `due_at_ms < before_ms`
        (id, due time and URL), ordered by `due_at_ms` then id; with `after` (a due time and id),
        only those ordered after it: the next page; with `partitions`, only timers in those.
        Served by the due-time index over pending timers only, which holds the partition."""

    @abc.abstractmethod
    def next_due_at_ms(self) -> int | None:
        """The earliest `due_at_ms` among `pending` timers, or None when there are none."""

    @abc.abstractmethod
    def count_by_state(self) -> dict[State, int]:
        """How many timers are in each state; states with none may be left out. Reads every
        timer: for `timerd status`, never a hot path (see `count_active`)."""

    @abc.abstractmethod
    def count_series(self) -> int:
        """How many series (timers with a `schedule`) are live: `pending`, `firing` or
        `paused`. Read through the index over series: for `timerd status`, not a hot path."""

    @abc.abstractmethod
    def count_active(self) -> dict[State, int]:
        """How many timers are `pending` and `firing`, from the indexes over those states
        alone, so the cost does not grow with finished timers (for metrics scrapes)."""

    @abc.abstractmethod
    def claim_due(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        """Claim, in one conditional write, those of `timer_ids` that are still `pending` with
        `due_at_ms <= claim.now_ms`: they become `firing` with `claimed_by = claim.owner`,
        `claimed_until_ms = claim.until_ms`, `claim_token = claim.token`, and `attempts` one
        higher.

        Returns exactly the timers this call claimed, as they now are, in no particular order.
        A timer that was cancelled, moved later, or claimed by someone else is left out.
        Two concurrent calls never both claim the same timer. A call that raises may have
        claimed some of them all the same (MongoDB applies a batch document by document): the
        caller gives them back with `release_claim(claim.token)`.
        """

    @abc.abstractmethod
    def release_claim(self, token: str) -> int:
        """Undo a claim that was never delivered (it failed, or came back too late to fire):
        every timer still `firing` under `token` returns to `pending` with its claim cleared and
        `attempts` one lower. Idempotent. Returns how many were released."""

    @abc.abstractmethod
    def complete(self, outcomes: Sequence[Outcome]) -> int:
        """Record delivery outcomes; each applies only if the timer is still `firing` under the
        outcome's `claim_token`, so a late outcome never lands on a newer claim of the same
        timer, nor on a timer the sweep has returned to pending.

        FIRED sets `fired_at_ms = at_ms` and `fired_by = owner`; FAILED ends the timer; both
        set `finished_at_ms = at_ms`; PENDING reschedules it to `next_due_at_ms` for another
        attempt. With `next_occurrence` (a series moving on), PENDING also sets `occurrence`
        to it, `occurrence_at_ms = next_due_at_ms` and `attempts` to 0, and, when the occurrence
        was delivered, `fired_at_ms` and `fired_by`; `occurrence_failed` adds one to
        `occurrences_failed`. With `callback_occurrence`, the timer's failure callback becomes
        `pending`, due at `at_ms`, for that occurrence, its attempts, claim, status and error
        cleared (superseding one not yet delivered). All clear the claim, set `last_status` and
        `last_error`, and append `record` (when given) to the history, which keeps only the
        newest `HISTORY_MAX` attempts. Returns how many outcomes were applied; the others are
        ignored. Applying the same outcomes twice changes nothing the second time.
        """

    @abc.abstractmethod
    def list_timers(
        self,
        state: State | None,
        before_id: str | None,
        limit: int,
        tenant: str | None = None,
        recurring: bool | None = None,
    ) -> list[Timer]:
        """Up to `limit` timers, newest first (descending id), in `state` if one is given, with
        ids below `before_id` if one is given: the cursor of the next page is the last id. With
        `recurring`, only series (True) or only one-off timers (False)."""

    @abc.abstractmethod
    def replay(self, timer_id: str, now_ms: int, tenant: str | None = None) -> Timer:
        """Put a `failed` or `fired` timer back to `pending`, due at `now_ms`, with `attempts`
        reset to 0 (a fresh retry budget), no longer finished, and its history kept; return it
        as it now is.

        Raises `TimerNotFound` for an unknown id, and `TimerStateConflict` (changing nothing)
        when the timer is pending, firing or cancelled.
        """

    @abc.abstractmethod
    def recover_expired(
        self, now_ms: int, limit: int, max_attempts: int, partitions: Sequence[int] | None = None
    ) -> int:
        """Settle up to `limit` `firing` timers (of `partitions`, when given) whose
        `claimed_until_ms < now_ms` (their owner died or stalled): each counts as an attempt
        that failed with `last_error` `claim_expired` (appended to the history), and returns
        to `pending` keeping `due_at_ms`,
        or ends `failed` (finished at `now_ms`) when its attempts reached its `max_attempts`
        (`max_attempts` when the timer has none). A series never ends here: it returns to
        `pending`, and the daemon's next attempt, finding the budget spent, ends the occurrence
        and moves the series on. A timer that ends `failed` here with an `on_failure_url` has
        its failure callback made pending, due at `now_ms` (as `complete` does). Returns how
        many were settled."""

    # failure callbacks (`timerd.callbacks`): a follow-up delivery carried by the timer's row

    @abc.abstractmethod
    def callbacks_due(
        self, before_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> list[Due]:
        """Up to `limit` timers whose callback is `pending` with `callback_due_at_ms <
        before_ms` (of `partitions`, when given), earliest first, as their id, callback due
        time and `on_failure_url`; read without claiming through the index over pending
        callbacks alone."""

    @abc.abstractmethod
    def claim_callbacks(self, timer_ids: Sequence[str], claim: Claim) -> list[Timer]:
        """Claim the callbacks of those of `timer_ids` that are still `pending` and due by
        `claim.now_ms`: they become `firing` under `claim.token` until `claim.until_ms`, with
        `callback_attempts` one higher. Returns exactly the timers claimed, as they now are.
        Two concurrent calls never both claim one callback."""

    @abc.abstractmethod
    def complete_callbacks(self, outcomes: Sequence[CallbackOutcome]) -> int:
        """Record callback attempts; each applies only while that callback is `firing` under
        the outcome's token: it becomes `delivered`, `failed` or `pending` again (due at
        `next_due_at_ms`), its claim cleared, `callback_status`/`callback_error` set. Returns
        how many applied; applying the same outcomes twice changes nothing the second time."""

    @abc.abstractmethod
    def recover_expired_callbacks(
        self, now_ms: int, limit: int, partitions: Sequence[int] | None = None
    ) -> int:
        """Return up to `limit` `firing` callbacks (of `partitions`, when given) whose
        `callback_until_ms < now_ms` to `pending` (due time kept, `callback_error`
        `claim_expired`); the attempt stays counted. Returns how many."""

    @abc.abstractmethod
    def purge_finished(self, before_ms: int, limit: int) -> int:
        """Delete up to `limit` timers that finished (fired, failed, cancelled) before
        `before_ms`, idempotency keys and history with them, through the index over finished
        timers, but not one whose failure callback is still `pending` or `firing`. Returns how
        many were deleted."""

    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_ms: int, now_ms: int) -> Lease | None:
        """Take or renew the lease `name` so that it expires at `now_ms + ttl_ms`.

        Succeeds when `holder` is the holder already, live or expired (the epoch stays), or the
        lease is absent or expired (`expires_at_ms < now_ms`; the epoch then rises by one,
        starting at 1). Returns the lease as written, or None while another holder's is live.
        """

    @abc.abstractmethod
    def renew_leases(
        self, holder: str, names: Sequence[str], ttl_ms: int, now_ms: int
    ) -> list[str]:
        """Renew, in one write, those of the leases `names` that `holder` still holds (live or
        expired, as `acquire_lease` would), to expire at `now_ms + ttl_ms`; return their names.
        A lease another holder took in the meantime is left alone and left out."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Expire the lease `name` at once if `holder` holds it under `epoch`, keeping the epoch
        so the next holder raises it. Returns whether this call released it."""

    @abc.abstractmethod
    def get_lease(self, name: str) -> Lease | None:
        """The lease document `name` as it is, live or expired; None before anyone took it."""

    @abc.abstractmethod
    def leases(self) -> list[Lease]:
        """Every lease document, live or expired, ordered by name."""

    @abc.abstractmethod
    def delete_leases(self, prefix: str, expired_before_ms: int) -> int:
        """Delete the leases whose name starts with `prefix` and that expired before
        `expired_before_ms` (the membership of daemons long gone). Returns how many."""

    @abc.abstractmethod
    def add_key(self, key: ApiKey) -> None:
        """Store a new API key (its `key_id` is unique)."""

    @abc.abstractmethod
    def get_key(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not; None when there is none."""

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]:
        """Every key, oldest first, revoked ones included."""

    @abc.abstractmethod
    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        """Mark a live key revoked at `now_ms`; returns whether it was live."""

    @abc.abstractmethod
    def server_time_ms(self) -> int | None:
        """The store's own clock (UTC epoch milliseconds), which every daemon and API host
        judges time by; None when the store shares this host's clock (SQLite)."""

    def nonblocking(self) -> AbstractContextManager[None] | None:
        """A context within which this thread's calls never wait: each completes at once (no
        lock held by another writer, no network round trip, no wait for the disk) or raises
        `WouldBlock` having changed nothing, to be made again where waiting is harmless. An
        event loop can then make most of its store calls itself instead of handing each to a
        thread. The context may be entered again and again, by any thread. None (the default)
        when the store cannot promise that: every MongoDB call is a round trip."""
        return None

    @abc.abstractmethod
    def checkpoint(self) -> None:
        """Copy what the store's write-ahead log holds into its main file, without waiting for
        readers or writers. Needed where calls made in `nonblocking` leave it to others; a
        no-op where the store does this itself (MongoDB)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the store answers a trivial query; raise `StoreUnavailable` otherwise."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads. The store must not be used afterwards."""

    # reads for the console (`GET /stats`, `GET /timers?url_prefix=`)

    @abc.abstractmethod
    def count_by_state_of(self, tenant: str, limit: int) -> dict[State, int]:
        """How many of `tenant`'s timers are in each state, counting no further than `limit` in
        any one (so the cost stays bounded however many finished timers it has); every state is
        present. Served by the (tenant, state, id) index."""

    @abc.abstractmethod
    def earliest_pending_of(self, tenant: str) -> Due | None:
        """`tenant`'s `pending` timer with the earliest `due_at_ms` (then the lowest id), or
        None when it has none."""

    @abc.abstractmethod
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
        """Up to `limit` timers whose `url` starts with `url_prefix`, newest first, found among
        the `scan` newest timers (in `state` and of `tenant` when given) with ids below
        `before_id`: a scan of the id index bounded by `scan`, however rare the matches.

        Returns them and the cursor of the next page: the last id returned when `limit` were
        found, else the oldest id scanned when the scan stopped at `scan` timers (the page may
        then be short, or empty), else None (nothing older is left).
        """
