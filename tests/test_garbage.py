"""The garbage collector's settings for a serving process (`timerd.garbage`)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.support.procs import TimerdProcesses
from tests.support.receiver import Receiver
from tests.test_observability import samples
from timerd import garbage


@pytest.fixture
def restored() -> Iterator[None]:
    yield
    garbage.defaults()


@pytest.mark.usefixtures("restored")
def test_serving_freezes_what_exists_and_collects_the_young_generation_less_often() -> None:
    before = gc.get_threshold()
    garbage.serving()
    assert gc.get_freeze_count() > 0  # the modules and objects of the set-up
    assert gc.get_threshold() == (garbage.YOUNG_THRESHOLD, before[1], before[2])


@pytest.mark.usefixtures("restored")
def test_cyclic_garbage_made_while_serving_is_still_collected() -> None:
    garbage.serving()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: reference counting alone never frees it
    del a, b
    assert gc.collect() >= 2


def test_defaults_undo_serving() -> None:
    before = gc.get_threshold()
    garbage.serving()
    garbage.defaults()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_a_serving_api_seldom_collects_under_concurrent_creates(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    """`timerd api` sets the collector up for serving: 3,000 creates from 64 clients at once
    ran about 200 young collections with Python's defaults, and none so."""
    api = procs.start("api", f"sqlite:///{tmp_path / 'timerd.db'}")
    young = ("python_gc_collections_total", (("generation", "0"),))
    before = samples(api.base_url)[young]

    async def create_all() -> None:
        slots = asyncio.Semaphore(64)
        async with aiohttp.ClientSession(api.base_url) as session:

            async def create(i: int) -> None:
                body = {"hours": 1, "url": f"http://x.test/hooks/{i}"}
                async with slots, session.post("/timers", json=body) as answer:
                    assert answer.status == 201

            await asyncio.gather(*(create(i) for i in range(3000)))

    asyncio.run(create_all())
    assert samples(api.base_url)[young] - before < 20


def test_a_firing_daemon_seldom_collects_during_a_burst(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    """Each firing process sets the collector up for serving too: 3,000 timers due at once
    ran about 180 young collections with Python's defaults, and none so."""
    store = f"sqlite:///{tmp_path / 'timerd.db'}"
    api = procs.start("api", store)
    daemon = procs.start("daemon", store)
    young = ("python_gc_collections_total", (("generation", "0"),))
    with Receiver() as receiver:
        due = {"seconds": 1, "url": receiver.url}
        for _ in range(3):
            batch = httpx.post(f"{api.base_url}/timers/batch", json=[due] * 1000, timeout=30)
            assert batch.status_code == 200
        before = samples(daemon.base_url)[young]
        receiver.wait_for(3000, timeout_s=30)
    assert samples(daemon.base_url)[young] - before < 20
