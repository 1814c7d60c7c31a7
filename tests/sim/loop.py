"""A virtual-time asyncio event loop: no real time passes.

When every task waits for a timer, the loop jumps its clock to the earliest one instead of
sleeping. Nothing runs on another thread: `run_in_executor` (hence `asyncio.to_thread`) runs the
function inline, so one seed gives exactly one interleaving.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the true wall clock at virtual time 0

ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("sim_actor", default="sim")


class Deadlock(RuntimeError):
    """Every task waits and no timer is scheduled: nothing can ever happen again."""


class RunawayLoop(RuntimeError):
    """The loop ran more iterations than the run's budget: a busy loop that never sleeps."""


class _VirtualSelector(selectors.BaseSelector):
    """Never has I/O; `select(timeout)` advances the virtual clock by `timeout`."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, 0, events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Deadlock("every task is waiting and no timer is scheduled")
        self._loop.advance(timeout)
        return []

    def get_map(self) -> dict[Any, selectors.SelectorKey]:
        return self._map


class VirtualLoop(asyncio.BaseEventLoop):
    """An event loop whose `time()` is virtual seconds, advanced only when all tasks wait."""

    def __init__(self, *, max_iterations: int = 5_000_000) -> None:
        super().__init__()
        self._vtime = 0.0
        self._selector = _VirtualSelector(self)
        self.iterations = 0
        self.max_iterations = max_iterations
        self.inline_executor_calls = 0
        self.unhandled: list[str] = []  # what the loop's exception handler was told
        self.tasks_by_actor: dict[str, weakref.WeakSet[asyncio.Task[Any]]] = {}
        self._task_seq = 0
        self.task_order: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = (
            weakref.WeakKeyDictionary()
        )
        self.set_exception_handler(self._record_unhandled)
        self.set_task_factory(self._make_task)

    # time

    def time(self) -> float:
        return self._vtime

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds`, landing exactly on the next timer when that is
        where it was going (float sums would otherwise stop a hair short of it)."""
        target = self._vtime + seconds
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        if scheduled and abs(scheduled[0].when() - target) < 1e-6:
            target = max(target, scheduled[0].when())
        self._vtime = max(self._vtime, target)

    # the loop's hooks

    def _run_once(self) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise RunawayLoop(f"more than {self.max_iterations} loop iterations")
        super()._run_once()  # type: ignore[misc]

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # call_soon_threadsafe: the callback is already queued; nothing to wake

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Run `func` now, on this thread: a simulation has no threads."""
        self.inline_executor_calls += 1
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # handed to the awaiting task, as a thread pool would
            future.set_exception(exc)
        return future

    def _record_unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        what = f"{context.get('message')}: {exc!r}" if exc is not None else context.get("message")
        self.unhandled.append(str(what))

    def _make_task(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
        **kwargs: Any,
    ) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
        context: contextvars.Context | None = kwargs.get("context")
        actor = context.get(ACTOR, "sim") if context is not None else ACTOR.get()
        self.tasks_by_actor.setdefault(actor, weakref.WeakSet()).add(task)
        self._task_seq += 1
        self.task_order[task] = self._task_seq
        return task

    def live_tasks(self, actor: str) -> list[asyncio.Task[Any]]:
        """The actor's unfinished tasks, oldest first (a stable order: sets of tasks are not)."""
        tasks = [t for t in self.tasks_by_actor.get(actor, ()) if not t.done()]
        return sorted(tasks, key=lambda t: self.task_order.get(t, 0))


class TrueClock:
    """The one true wall clock of the simulated world, which no process reads directly."""

    def __init__(self, loop: VirtualLoop, epoch_ms: int = EPOCH_MS) -> None:
        self._loop = loop
        self._epoch_ms = epoch_ms

    def now_ms(self) -> int:
        return self._epoch_ms + int(self._loop.time() * 1000)

    def monotonic_s(self) -> float:
        return self._loop.time()


class SkewedClock:
    """A host's clocks: the true wall clock off by `skew_ms`, a monotonic clock of its own."""

    def __init__(self, true: TrueClock, skew_ms: int, monotonic_base_s: float) -> None:
        self._true = true
        self.skew_ms = skew_ms
        self._base_s = monotonic_base_s

    def now_ms(self) -> int:
        return self._true.now_ms() + self.skew_ms

    def monotonic_s(self) -> float:
        return self._base_s + self._true.monotonic_s()


__all__ = [
    "ACTOR",
    "EPOCH_MS",
    "Deadlock",
    "RunawayLoop",
    "SkewedClock",
    "TrueClock",
    "VirtualLoop",
]
