"""Failure callbacks without processes: which outcomes make a callback due (`judge`), how a
callback attempt is judged, and what it sends (its `webhook-id` and body)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from tests.support.offload import inline
from tests.test_daemon import START_MS, FakeClock, Recorder
from timerd.callbacks import CallbackFirer, judge_callback
from timerd.callbacks_body import callback_body, callback_webhook_id
from timerd.delivery import Attempt
from timerd.models import AttemptRecord, CallbackState, State, Timer, new_timer_id
from timerd.outcomes import judge
from timerd.retry import RetryPolicy
from timerd.settings import Settings
from timerd.store import Store, open_store

NOW = 1_700_000_000_000
POLICY = RetryPolicy((1.0, 2.0))
HOOK = "https://ops.example/failed"


def claimed(**fields: object) -> Timer:
    timer = Timer(
        id=new_timer_id(),
        url="https://receiver.example/hooks",
        due_at_ms=NOW,
        created_at_ms=NOW - 1000,
        state=State.FIRING,
        attempts=1,
        claim_token="t",
        claimed_by="d",
        claimed_until_ms=NOW + 30_000,
    )
    return dataclasses.replace(timer, **fields)


def test_a_failure_makes_the_callback_due_only_with_an_on_failure_url() -> None:
    gone = Attempt(NOW, 1.0, status=410)
    assert judge(claimed(on_failure_url=HOOK), gone, POLICY, NOW).callback_occurrence == 0
    assert judge(claimed(), gone, POLICY, NOW).callback_occurrence is None
    retry = judge(claimed(on_failure_url=HOOK), Attempt(NOW, 1.0, status=503), POLICY, NOW)
    assert (retry.state, retry.callback_occurrence) == (State.PENDING, None)
    fired = judge(claimed(on_failure_url=HOOK), Attempt(NOW, 1.0, status=204), POLICY, NOW)
    assert fired.callback_occurrence is None


def test_a_callback_attempt_is_retried_on_the_schedule_then_fails() -> None:
    timer = claimed(callback_token="c", callback_attempts=1, on_failure_url=HOOK)
    retry = judge_callback(timer, Attempt(NOW, 1.0, status=503), POLICY, NOW)
    assert retry.state is CallbackState.PENDING and retry.next_due_at_ms is not None
    assert NOW + 900 <= retry.next_due_at_ms <= NOW + 1100
    spent = dataclasses.replace(timer, callback_attempts=3)
    failed = judge_callback(spent, Attempt(NOW, 1.0, error="timeout"), POLICY, NOW)
    assert (failed.state, failed.error, failed.next_due_at_ms) == (
        CallbackState.FAILED,
        "timeout",
        None,
    )
    gone = judge_callback(timer, Attempt(NOW, 1.0, status=404), POLICY, NOW)
    assert gone.state is CallbackState.FAILED
    done = judge_callback(timer, Attempt(NOW, 1.0, status=200), POLICY, NOW)
    assert (done.state, done.claim_token) == (CallbackState.DELIVERED, "c")


def test_the_callback_names_the_timer_and_occurrence_and_carries_its_history() -> None:
    record = AttemptRecord(1, NOW, 2.5, status=410, response="gone")
    one_off = claimed(
        state=State.FAILED,
        last_status=410,
        payload='{"a":1}',
        history=(record,),
        callback_attempts=2,
    )
    assert callback_webhook_id(one_off) == f"{one_off.id}_failed"
    body = json.loads(callback_body(one_off))
    assert (body["type"], body["id"], body["attempt"]) == ("timer.failed", one_off.id, 2)
    assert "occurrence" not in body
    assert body["timer"]["payload"] == {"a": 1}
    assert body["timer"]["history"] == [record.as_dict()]
    series = dataclasses.replace(one_off, schedule="{}", occurrence=5, callback_occurrence=4)
    assert callback_webhook_id(series) == f"{series.id}_4_failed"
    assert json.loads(callback_body(series))["occurrence"] == 4


def test_the_firer_claims_no_more_than_a_hosts_free_slots(tmp_path: Path) -> None:
    """A real SQLite store and the daemon's `CallbackFirer`, a clock moved by hand and a
    deliverer held at a gate: a busy host's callbacks stay pending (unclaimed), another host's
    go, and the rest go once slots free."""
    clock = FakeClock()
    recorder = Recorder(clock)
    recorder.gate = asyncio.Event()
    store = open_store(f"sqlite:///{tmp_path / 'timerd.db'}")
    slow = [failed(store, "http://slow.test/f") for _ in range(4)]
    fast = failed(store, "http://fast.test/f")
    clock.advance(10)

    async def scenario() -> None:
        assert recorder.gate is not None
        spawned: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as tasks:

            def spawn(work: Coroutine[Any, Any, None]) -> None:
                spawned.append(tasks.create_task(work))

            firer = CallbackFirer(
                Settings(per_host_concurrency=2),
                store,
                recorder,
                clock=clock,
                offload=inline,
                holder="d",
                held=lambda: list(range(store.partitions())),
                partitions=store.partitions(),
                spawn=spawn,
            )
            await firer.tick()
            await asyncio.sleep(0)
            # Two of the busy host's four (which two is the due index's order: by partition
            # among equal due times), and the other host's one.
            sent_slow = [i for i in recorder.ids if i in slow]
            assert len(sent_slow) == 2 and sorted(recorder.ids) == sorted([*sent_slow, fast])
            states = [store.get(i).callback_state for i in slow if i not in sent_slow]
            assert states == [CallbackState.PENDING] * 2
            recorder.gate.set()
            await asyncio.gather(*spawned)
            assert firer.inflight == 0
            await firer.tick()
        assert sorted(recorder.ids) == sorted([*slow, fast])
        assert {store.get(i).callback_state for i in [*slow, fast]} == {CallbackState.DELIVERED}

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def failed(store: Store, on_failure_url: str) -> str:
    """A timer that failed, its callback to `on_failure_url` pending since START_MS."""
    timer = Timer(
        id=new_timer_id(),
        url="http://127.0.0.1:9/h",
        due_at_ms=START_MS,
        created_at_ms=START_MS,
        state=State.FAILED,
        on_failure_url=on_failure_url,
        callback_state=CallbackState.PENDING,
        callback_due_at_ms=START_MS,
    )
    store.insert(timer)
    return timer.id
