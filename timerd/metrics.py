"""Prometheus metrics of both processes, in the exposition format of `prometheus_client`.

Process-wide objects, defined once here; the API and the daemon update them, and whichever
process holds a store registers `StoreCollector` so a scrape reports the backlog as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from timerd.clock import Clock
from timerd.errors import StoreUnavailable
from timerd.models import State
from timerd.store import Store

_LATENESS_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

TIMERS_CREATED = Counter("timerd_timers_created", "Timers created through the API.")
API_REQUESTS = Counter(
    "timerd_api_requests",
    "API requests answered, by route, method and status.",
    ["route", "method", "status"],
)
DELIVERIES = Counter(
    "timerd_deliveries", "Delivery attempts, by outcome (fired, retry, failed).", ["outcome"]
)
# The outcome an attempt's resulting state stands for, resolved once (labels() costs a lookup).
DELIVERIES_BY_STATE = {
    State.FIRED: DELIVERIES.labels("fired"),
    State.PENDING: DELIVERIES.labels("retry"),
    State.FAILED: DELIVERIES.labels("failed"),
}
DELIVERY_LATENCY = Histogram(
    "timerd_delivery_latency_seconds",
    "Time from sending a webhook to its answer.",
    buckets=_LATENCY_BUCKETS_S,
)
LATENESS = Histogram(
    "timerd_lateness_seconds",
    "Time from a timer's due instant to sending its webhook.",
    buckets=_LATENESS_BUCKETS_S,
)
IN_FLIGHT = Gauge("timerd_deliveries_in_flight", "Deliveries under way in this daemon.")
LEADER = Gauge("timerd_leader", "1 while this daemon holds at least one partition, else 0.")
PARTITIONS_HELD = Gauge(
    "timerd_partitions_held", "Partitions of the timer space this daemon holds."
)


class StoreCollector(Collector):
    """Reads the backlog from the store at each scrape: timers by state, oldest overdue age."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.count_active()
            next_due_ms = self.store.next_due_at_ms()
        except StoreUnavailable:
            return  # the scrape still answers; `up`-style alerts see the missing series
        timers = GaugeMetricFamily(
            "timerd_timers",
            "Timers in the store that are pending or firing (finished ones are not counted).",
            labels=["state"],
        )
        for state, count in counts.items():
            timers.add_metric([state.value], count)
        yield timers
        overdue_s = 0.0 if next_due_ms is None else max(0, self.clock.now_ms() - next_due_ms) / 1000
        yield GaugeMetricFamily(
            "timerd_oldest_overdue_seconds",
            "How long the earliest pending timer has been due (0 when none is overdue).",
            value=overdue_s,
        )


def watch_store(store: Store, clock: Clock) -> None:
    """Report this store's backlog in every scrape of this process."""
    REGISTRY.register(StoreCollector(store, clock))
