"""`timerd bench` end to end at a tiny size: the store-scale shape builds a store like a real one
and times its hot calls, and a burst fired by two processes loses, doubles and hastens nothing.
Real processes on loopback; the figures themselves are not judged, only that they are there and
sane."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from tests.support.procs import TIMERD, timerd_env
from timerd.bench import DEFAULT_CEILING, REPO_ROOT, finished_kind
from timerd.models import PARTITIONS

STATS = ("first", "min", "median", "p99", "max")


def bench(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> dict[str, Any]:
    """Run `timerd bench ARGS`; return its JSON line (it prints exactly one on stdout)."""
    done = subprocess.run(
        [str(TIMERD), "bench", *args],
        env=timerd_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


def assert_timings(figures: dict[str, dict[str, float]], names: set[str]) -> None:
    assert set(figures) >= names
    for name, ms in figures.items():
        assert set(ms) == set(STATS), name
        assert 0 < ms["min"] <= ms["median"] <= ms["p99"] <= ms["max"], (name, ms)
        assert ms["min"] <= ms["first"] <= ms["max"], (name, ms)


def test_store_scale_builds_a_realistic_store_and_times_every_hot_call(tmp_path: Path) -> None:
    db = tmp_path / "scale.db"
    result = bench(
        "--shape", "store-scale", "--n", "2000", "--pending", "1000", "--repeat", "20",
        "--store", f"sqlite:///{db}",
    )  # fmt: skip

    assert (result["shape"], result["n"], result["pending"], result["built"]) == (
        "store-scale", 2000, 1000, True,
    )  # fmt: skip
    assert result["log_level"] == "info"
    assert result["log_level_from"] == "default"
    checks = result["store_checks"]
    assert checks["pending"] == 1000
    assert checks["cap_check_counted"] == 600  # the tenant with most pending has 60 % of them
    assert checks["list_rows"] == checks["list_deep_rows"] == checks["list_failed_rows"] == 50
    assert checks["due_poll_page_rows"] > 0
    assert checks["idempotency_hit_found"] is True
    assert_timings(
        result["store_ms"],
        {"metrics", "cap_check", "list", "list_fired", "list_failed", "due_poll_idle",
         "idempotency_hit", "idempotency_miss"},
    )  # fmt: skip
    assert result["http_checks"] == {"list_rows": 50, "metrics_has_timers": True}
    assert_timings(result["http_ms"], {"metrics", "list", "list_failed"})

    # the file holds what the daemon would have left: finished timers with their history
    with closing(sqlite3.connect(db)) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM timers GROUP BY state"))
        unfinished = conn.execute(
            "SELECT count(*) FROM timers WHERE state != 'pending' AND finished_at_ms IS NULL"
        ).fetchone()[0]
        fired_without_history = conn.execute(
            "SELECT count(*) FROM timers WHERE state IN ('fired', 'failed')"
            " AND (history IS NULL OR fired_at_ms IS NULL AND state = 'fired')"
        ).fetchone()[0]
        tenants = conn.execute("SELECT count(DISTINCT tenant) FROM timers").fetchone()[0]
    expected = Counter(finished_kind(i).value for i in range(2000)) + Counter(pending=1000)
    assert states == expected
    assert 1700 < states["fired"] < 1900 and states["failed"] > 50 and states["cancelled"] > 20
    assert unfinished == fired_without_history == 0
    assert tenants == result["tenants"] > 1

    # a second run on the same file reuses it instead of building it again
    again = bench(
        "--shape", "store-scale", "--n", "2000", "--repeat", "5", "--store", f"sqlite:///{db}"
    )  # fmt: skip
    assert again["built"] is False
    assert again["counted"]["fired"] == states["fired"]


def test_a_burst_fired_by_two_processes_is_complete_and_compared_with_the_ceiling() -> None:
    ceiling = (REPO_ROOT / DEFAULT_CEILING).resolve()
    result = bench(
        "--shape", "burst", "--workers", "2", "--n", "200", "--lead-s", "2", "--margin-s", "10",
        *(() if ceiling.exists() else ("--ceiling", "none")),
        env={"TIMERD_LEASE_RENEW_S": "1"},  # the second process takes its share sooner
    )  # fmt: skip

    assert (result["workers"], result["workers_from"]) == (2, "--workers")
    assert result["urls"] == "one per timer"
    assert result["log_level"] == "info"
    assert len(result["partitions_held"]) == 2
    assert sum(result["partitions_held"]) == PARTITIONS
    assert result["created"] == result["arrived"] == 200
    assert result["lost"] == result["duplicates"] == result["early"] == result["strangers"] == 0
    assert result["fires_per_s"] > 0
    assert 0 <= result["late_ms_p50"] <= result["late_ms_p99"] <= result["late_ms_max"]
    assert result["states"]["fired"] == 200
    fired_by = result["fired_by_process"]
    assert len(fired_by) == 2 and sum(fired_by) == 200  # both processes fired their share
    assert {"worker0", "worker1"} <= set(result["cpu_s_fire"])
    if ceiling.exists():
        assert result["ceiling"]["loop"] == "uvloop"
        assert result["ceiling"]["missing"] == 0
        assert result["ceiling"]["fires_per_s"] > 0
        assert result["ratio_to_ceiling"] > 0
        assert result["floor"]["creates_per_s"] > 0 and result["floor"]["errors"] == {}
        assert result["create_ratio_to_floor"] > 0  # one command, both ratios
    else:
        assert result["ceiling"] is None


def test_the_create_shape_measures_timerd_next_to_the_floor_and_batches() -> None:
    result = bench("--shape", "create", "--n", "200", "--clients", "8")

    assert (result["shape"], result["n"], result["clients"]) == ("create", 200, 8)
    assert result["urls"] == "one per timer"
    assert result["log_level"] == "info"
    assert result["errors"] == {} and result["floor"]["errors"] == {}
    assert result["creates_per_s"] > 0 and result["floor"]["creates_per_s"] > 0
    assert result["cpu_ms_per_create"] > 0
    assert result["create_ratio_to_floor"] == round(
        result["creates_per_s"] / result["floor"]["creates_per_s"], 3
    )
    batch = result["batch"]
    assert batch["batch_size"] == 1000 and batch["errors"] == {} and batch["timers_per_s"] > 0
    # every create answered 201 is in the file: warm-up, measured creates and one batch
    assert result["states"] == {"pending": 500 + 200 + 1000}


def test_fire_cpu_measures_each_part_of_a_fire_in_every_round() -> None:
    result = bench("--shape", "fire-cpu", "--n", "300", "--repeat", "2")

    assert (result["shape"], result["n"], result["rounds"]) == ("fire-cpu", 300, 2)
    assert (result["log_level"], result["log_level_from"]) == ("info", "default")
    figures = result["us_per_fire"]
    assert set(figures) == {"daemon", "delivery", "bare_post"}
    for part, us in figures.items():
        assert len(us["runs"]) == 2, part
        assert 0 < us["min"] <= us["median"] <= max(us["runs"]), (part, us)
