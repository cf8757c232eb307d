"""The gateway's Prometheus metrics, registered on a registry the app owns (no globals).

With several worker processes, `prometheus_client`'s multiprocess mode is used: the CLI
sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts, every worker writes its values
to files there, and ``/metrics`` aggregates them (see `render_metrics`).
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

M = TypeVar("M", Counter, Gauge, Histogram)

# Gateway overhead lives well under a millisecond; upstream calls take up to minutes.
_OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)  # fmt: skip
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


class GatewayMetrics:
    """Every metric the request path records, created once per app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "sluice_requests_total",
            "Requests answered, by public model, route and HTTP status.",
            ["model", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sluice_request_duration_seconds",
            "End-to-end time from request received to last byte sent.",
            ["model", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "sluice_upstream_duration_seconds",
            "Time spent waiting on the backend (whole body, or whole stream).",
            ["model", "deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "sluice_gateway_overhead_seconds",
            "End-to-end time minus upstream time: what the gateway itself adds.",
            ["route"],
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "Streams: time from request received to the first chunk relayed.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "sluice_tokens_total",
            "Tokens reported by upstream usage, by model and kind (prompt/completion).",
            ["model", "kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "sluice_in_flight_requests",
            "Requests being served right now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.limiter_failures = Counter(
            "sluice_limiter_failures_total",
            "Rate-limiter calls that failed (Redis unreachable); fail-open admits the request.",
            registry=registry,
        )
        self.usage_write_failures = Counter(
            "sluice_usage_write_failures_total",
            "Failed batched writes of usage records (each is retried; none is dropped).",
            registry=registry,
        )
        self.usage_writer_restarts = Counter(
            "sluice_usage_writer_restarts_total",
            "Times the usage writer died of an unexpected error and was restarted.",
            registry=registry,
        )
        self.usage_dead_letter = Counter(
            "sluice_usage_dead_letter_total",
            "Usage records the database refused for good, set aside in the dead-letter file.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors_total",
            "Backend failures by model, deployment and kind (timeout, unreachable, http_5xx…).",
            ["model", "deployment", "kind"],
            registry=registry,
        )
        # Cached children for the request path (see ChildCache).
        self.requests_for = ChildCache(self.requests)
        self.latency_for = ChildCache(self.latency)
        self.upstream_latency_for = ChildCache(self.upstream_latency)
        self.overhead_for = ChildCache(self.overhead)
        self.ttft_for = ChildCache(self.ttft)
        self.tokens_for = ChildCache(self.tokens)
        self.upstream_errors_for = ChildCache(self.upstream_errors)
        # Load shedding (`sluice.routing.capacity`): each deployment binds its children once.
        self.shed = Counter(
            "sluice_shed_requests_total",
            "Requests a deployment refused without an upstream call, by reason: queue_full, "
            "wait_timeout (waited, or would have waited, past max_wait), reserved (only the "
            "share kept for priority keys was left).",
            ["model", "deployment", "reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Time requests waited in a deployment's queue for a concurrency slot (only those "
            "that found no slot free), whether they got one or were refused.",
            ["model", "deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_waiting = Gauge(
            "sluice_queue_waiting_requests",
            "Requests waiting in a deployment's queue for a concurrency slot now.",
            ["model", "deployment"],
            registry=registry,
            multiprocess_mode="livesum",
        )


class ChildCache(Generic[M]):
    """Labelled children of one metric, looked up once per label combination.

    ``metric.labels(...)`` takes a lock and builds a key on every call; on the request path
    the same few combinations repeat, so their children are kept in a plain dict.
    """

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` (aggregated across workers in multiprocess mode)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        collecting = CollectorRegistry()
        MultiProcessCollector(collecting, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(collecting), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
