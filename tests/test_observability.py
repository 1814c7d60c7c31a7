"""Health, readiness and Prometheus metrics of both processes, against real subprocesses."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from tests.support.procs import TimerdProcesses, free_port, run_timerd
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.errors import StoreUnavailable
from timerd.models import PARTITIONS
from timerd.settings import Settings
from timerd.status import redact_url
from timerd.store import Store, open_store

FAST = {"TIMERD_LEASE_TTL_S": "2", "TIMERD_LEASE_RENEW_S": "0.5", "TIMERD_POLL_INTERVAL_S": "0.5"}


def samples(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    page = httpx.get(f"{base_url}/metrics")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
    }


def test_api_metrics_count_creates_requests_and_the_backlog(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    api = procs.start("api", f"sqlite:///{tmp_path / 'timerd.db'}")
    for _ in range(3):
        created = httpx.post(f"{api.base_url}/timers", json={"hours": 1, "url": "http://x.test"})
        assert created.status_code == 201
    httpx.get(f"{api.base_url}/timers/0123456789abcdef01234567")
    seen = samples(api.base_url)
    assert seen[("timerd_timers_created_total", ())] == 3
    assert seen[("timerd_timers", (("state", "pending"),))] == 3
    assert seen[("timerd_oldest_overdue_seconds", ())] == 0
    create = (("method", "POST"), ("route", "/timers"), ("status", "201"))
    assert seen[("timerd_api_requests_total", create)] == 3
    missing = (("method", "GET"), ("route", "/timers/{timer_id}"), ("status", "404"))
    assert seen[("timerd_api_requests_total", missing)] == 1


def test_the_daemon_serves_its_own_metrics_and_probes(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'timerd.db'}"
    api = procs.start("api", store)
    daemon = procs.start("daemon", store, env=FAST)
    with Receiver() as receiver:
        for _ in range(4):
            httpx.post(f"{api.base_url}/timers", json={"seconds": 0.001, "url": receiver.url})
        receiver.wait_for(4)
        wait_until(
            lambda: (
                samples(daemon.base_url).get(("timerd_deliveries_total", (("outcome", "fired"),)))
                == 4
            ),
            10,
            "four fired deliveries in the daemon's metrics",
        )
    seen = samples(daemon.base_url)
    assert seen[("timerd_leader", ())] == 1
    assert seen[("timerd_partitions_held", ())] == PARTITIONS  # alone, it holds them all
    assert seen[("timerd_lateness_seconds_count", ())] == 4
    assert seen[("timerd_delivery_latency_seconds_count", ())] == 4
    assert seen[("timerd_deliveries_in_flight", ())] == 0
    assert seen[("timerd_timers", (("state", "pending"),))] == 0  # finished ones are not counted
    assert seen[("timerd_timers", (("state", "firing"),))] == 0
    assert ("timerd_timers", (("state", "fired"),)) not in seen
    assert httpx.get(f"{daemon.base_url}/healthz").status_code == 200
    assert httpx.get(f"{daemon.base_url}/readyz").status_code == 200


class SwitchableStore:
    """A real SQLite store whose `ping` fails while `down` is set: the one fault injected here,
    since nothing real makes an open SQLite file unreadable to root mid-run."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off by the test")
        self.inner.ping()


def test_readyz_is_503_while_the_store_is_down_and_healthz_stays_200(tmp_path: Path) -> None:
    store = SwitchableStore(open_store(f"sqlite:///{tmp_path / 'timerd.db'}"))
    app = create_app(Settings(), store)  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started, 10, "uvicorn to start")
        assert httpx.get(f"{base}/readyz").status_code == 200
        store.down = True
        assert httpx.get(f"{base}/readyz").status_code == 503
        assert httpx.get(f"{base}/healthz").status_code == 200
        store.down = False
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        store.inner.close()


def test_status_shows_daemons_partitions_counts_backlog_and_lateness(
    procs: TimerdProcesses, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'timerd.db'}"
    api = procs.start("api", store_url)
    daemon = procs.start("daemon", store_url, env=FAST)
    with Receiver() as receiver:
        for _ in range(3):
            httpx.post(f"{api.base_url}/timers", json={"seconds": 0.001, "url": receiver.url})
        httpx.post(f"{api.base_url}/timers", json={"hours": 1, "url": receiver.url})
        httpx.post(f"{api.base_url}/timers", json={"every": "1h", "url": receiver.url})
        receiver.wait_for(3)
        wait_until(
            lambda: "fired 3" in run_timerd(["status", "--store", store_url]).stdout,
            10,
            "the outcomes to be written",
        )
    shown = run_timerd(["status", "--store", store_url])
    assert shown.returncode == 0, shown.stderr
    daemon_lines = [line for line in shown.stdout.splitlines() if line.startswith("  ")]
    lines = dict(line.split(":", 1) for line in shown.stdout.splitlines() if line[0] != " ")
    assert lines["store"].strip() == store_url
    assert lines["daemons"].strip() == f"1 live, {PARTITIONS} of {PARTITIONS} partitions held"
    assert len(daemon_lines) == 1 and f":{daemon.pid}:" in daemon_lines[0]
    assert f"holds {PARTITIONS} partitions (0-{PARTITIONS - 1}); fired 3 of" in daemon_lines[0]
    assert lines["timers"].strip() == (
        "pending 2, firing 0, fired 3, failed 0, cancelled 0, paused 0"
    )
    assert lines["series"].strip().startswith("1 recurring live")
    assert lines["callbacks"].strip() == "0 failure callbacks due now"
    assert lines["next due"].strip().startswith("in ")
    assert lines["lateness"].strip().startswith("last 3 fired: p50 ")


def test_status_hides_a_password_in_the_store_url() -> None:
    assert (
        redact_url("mongodb://admin:s3cret@db1,db2/timerd") == "mongodb://admin:***@db1,db2/timerd"
    )
    assert redact_url("sqlite:///timerd.db") == "sqlite:///timerd.db"
