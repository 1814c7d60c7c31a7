"""Fault: the API killed with SIGKILL in the middle of concurrent creates, five times.

Six client threads POST timers to one `timerd api` as fast as it answers; after a varying
number of 201s the API is killed and started again on the same SQLite file. Every timer a
client was answered 201 for must then be readable (`GET /timers/<id>` answers 200 with the same
due time). Creates cut off by the kill may or may not be stored; both are allowed.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections import Counter
from contextlib import closing
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import now_ms, rfc3339, store_url
from tests.support.faults import Figures, report
from tests.support.procs import TimerdProcesses
from tests.support.waiting import wait_until

pytestmark = pytest.mark.faults

KILLS = 5
THREADS = 6
MAX_POSTS = 2000  # per thread and cycle: bounds the loop whatever happens
URL = "http://127.0.0.1:9/hooks"  # never called: the timers are due in an hour, no daemon runs


class Creates:
    """Every 201 the clients saw (id → due ms), and every other ending, by kind."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.other: Counter[str] = Counter()
        self.lock = threading.Lock()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def post_until_gone(self, base_url: str, seed: int) -> None:
        """POST timers until the API stops answering (the kill) or `MAX_POSTS`."""
        rng = random.Random(seed)
        with httpx.Client(base_url=base_url, timeout=5.0) as client:
            for _ in range(MAX_POSTS):
                due_ms = now_ms() + 3_600_000 + rng.randrange(60_000)
                body = {"url": URL, "fire_at": rfc3339(due_ms)}
                try:
                    answer = client.post("/timers", json=body)
                except httpx.TransportError as exc:
                    with self.lock:
                        self.other[type(exc).__name__] += 1
                    return
                with self.lock:
                    if answer.status_code == 201:
                        self.acked[answer.json()["id"]] = due_ms
                    else:
                        self.other[str(answer.status_code)] += 1


def test_every_create_answered_201_survives_the_api_killed_mid_create(
    procs: TimerdProcesses, db: Path
) -> None:
    rng = random.Random(9)
    creates = Creates()
    for cycle in range(KILLS):
        api = procs.start("api", store_url(db))
        threads = [
            threading.Thread(target=creates.post_until_gone, args=(api.base_url, cycle * 10 + t))
            for t in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        target = creates.count() + rng.randint(100, 300)
        wait_until(lambda n=target: creates.count() >= n, 30, f"{target} creates")
        assert api.kill() == -9
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads), "a client did not stop"
    api = procs.start("api", store_url(db))
    with httpx.Client(base_url=api.base_url, timeout=5.0) as client:
        answers = {i: client.get(f"/timers/{i}") for i in creates.acked}
    missing = sorted(i for i, answer in answers.items() if answer.status_code != 200)
    wrong_due = sorted(
        i
        for i, answer in answers.items()
        if answer.status_code == 200 and epoch_ms(answer.json()["fire_at"]) != creates.acked[i]
    )
    with closing(sqlite3.connect(db)) as conn:
        [(stored,)] = conn.execute("SELECT count(*) FROM timers").fetchall()
    problems = []
    if missing:
        problems.append(f"{len(missing)} timer(s) answered 201 are gone, first: {missing[:3]}")
    if wrong_due:
        problems.append(f"{len(wrong_due)} timer(s) came back with another due time")
    cut_off = sum(n for kind, n in creates.other.items() if not kind.isdigit())
    refused = {kind: n for kind, n in creates.other.items() if kind.isdigit()}
    if refused:
        problems.append(f"creates refused while the API was up: {refused}")
    report(
        Figures(
            test="API kill -9 mid-create x5",
            timers=len(creates.acked),
            faults=f"{KILLS} x SIGKILL of the API under {THREADS} concurrent clients",
            lost=len(missing),
            duplicates=0,
            early=0,
            extra={
                "creates_cut_off": cut_off,
                "stored_without_201": stored - (len(creates.acked) - len(missing)),
            },
            problems=problems,
        )
    )
    assert not problems, "\n".join(problems)


def epoch_ms(rfc3339_time: str) -> int:
    return round(datetime.fromisoformat(rfc3339_time).timestamp() * 1000)
