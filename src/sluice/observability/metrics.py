"""The gateway's Prometheus metrics, registered on a registry the app owns (no globals).

With several worker processes, `prometheus_client`'s multiprocess mode is used: the CLI
sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts, every worker writes its values
to files there, and ``/metrics`` aggregates them (see `render_metrics`).
"""

from __future__ import annotations

import os
from typing import Generic, Literal, TypeVar

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
# A shadow's time over the primary's: 1 is as fast.
_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

_ATTEMPT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10)


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
        self.usage_backlog = Gauge(
            "sluice_usage_backlog_records",
            "Usage records waiting to be written (buffered, or in a write under way).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.usage_last_write = Gauge(
            "sluice_usage_last_write_timestamp_seconds",
            "When a usage write last succeeded (Unix time; 0 before the first).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.request_errors = Counter(
            "sluice_request_errors_total",
            "Requests answered with an error, by public model and kind: where it came from "
            "(invalid_request, rate_limit, upstream_timeout, upstream_http_5xx, ...).",
            ["model", "kind"],
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
        self.request_errors_for = ChildCache(self.request_errors)
        # Balancing and health, per deployment: the gauges are published from the live
        # state once a second (`sluice.routing.monitor`), never on the request path.
        self.deployment_ejections = Counter(
            "sluice_deployment_ejections_total",
            "Ejections by outlier detection, by reason "
            "(consecutive, error_rate, slow_rate, half_open).",
            ["model", "deployment", "reason"],
            registry=registry,
        )
        self.deployment_ejected = _deployment_gauge(
            registry,
            "sluice_deployment_ejected",
            "1 while outlier detection keeps the deployment out of rotation "
            "(ejected, or half-open until a probe succeeds).",
            "livemax",
        )
        self.deployment_cooling = _deployment_gauge(
            registry,
            "sluice_deployment_cooling",
            "1 while the deployment cools after an upstream 429 (for its Retry-After).",
            "livemax",
        )
        self.deployment_outstanding = _deployment_gauge(
            registry,
            "sluice_deployment_outstanding",
            "Attempts under way at the deployment.",
            "livesum",
        )
        self.deployment_max_concurrency = _deployment_gauge(
            registry,
            "sluice_deployment_max_concurrency",
            "The deployment's cap on attempts under way (max_concurrency; each worker has "
            "its own, so they add up); 0 for a deployment without a cap.",
            "livesum",
        )
        self.deployment_ttfb = _deployment_gauge(
            registry,
            "sluice_deployment_ttfb_ewma_seconds",
            "Smoothed time to the first response byte, as latency balancing sees it "
            "(models with several deployments).",
            "livemax",
        )
        # Versions, shadow traffic and reloads (docs/resilience.md).
        self.alias_choices = Counter(
            "sluice_alias_choices_total",
            "Requests to an alias, by the version chosen to serve them.",
            ["alias", "version"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "sluice_shadow_requests_total",
            "Shadow copies by outcome: sent, dropped (too many in flight), failed.",
            ["alias", "outcome"],
            registry=registry,
        )
        self.shadow_latency_ratio = Histogram(
            "sluice_shadow_latency_ratio",
            "Shadow upstream time over the primary's, per compared request.",
            ["alias"],
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        self.shadow_matches = Counter(
            "sluice_shadow_matches_total",
            "Compared complete answers whose content matched the primary's exactly, or not.",
            ["alias", "result"],
            registry=registry,
        )
        self.shadow_tokens = Counter(
            "sluice_shadow_completion_tokens_total",
            "Completion tokens of compared requests, the primary's and the shadow's.",
            ["alias", "side"],
            registry=registry,
        )
        self.reloads = Counter(
            "sluice_config_reloads_total",
            "Configuration reloads by outcome (ok, invalid, restart_needed, failed).",
            ["outcome"],
            registry=registry,
        )
        self.config_generation = Gauge(
            "sluice_config_generation",
            "The model table in use: 1 at start-up, one more per reload or weight change.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.config_generation.set(1)
        self.alias_choices_for = ChildCache(self.alias_choices)
        self._retry_metrics(registry)

    def usage_progress(self, pending: int, last_write: float | None) -> None:
        """The usage writer's turn (`sluice.store.recorder.UsageRecorder`)."""
        self.usage_backlog.set(pending)
        if last_write is not None:
            self.usage_last_write.set(last_write)

    def _retry_metrics(self, registry: CollectorRegistry) -> None:
        """Retries and fallbacks (`sluice.pipeline.attempts`, docs/resilience.md)."""
        self.retries = Counter(
            "sluice_retries_total",
            "Upstream calls repeated after a failure, by the model and deployment that failed "
            "and the failure's kind.",
            ["model", "deployment", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "sluice_fallbacks_total",
            "Requests moved to a fallback model, by requested model, the model that failed, "
            "the fallback and the list it came from (generic, context_window, content_policy).",
            ["model", "from", "to", "kind"],
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "sluice_retry_budget_exhausted_total",
            "Retries not sent because the deployment's retry budget was empty.",
            ["deployment"],
            registry=registry,
        )
        self.retry_budget = Gauge(
            "sluice_retry_budget_available",
            "Retries a deployment's budget allows now (updated at most once a second while "
            "requests flow, and at each retry).",
            ["deployment"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.attempts = Histogram(
            "sluice_upstream_attempts",
            "Upstream calls per request, observed for requests that made other than one "
            "(the rest are sluice_requests_total less this count).",
            buckets=_ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.retries_for = ChildCache(self.retries)
        self.fallbacks_for = ChildCache(self.fallbacks)
        self.retry_budget_exhausted_for = ChildCache(self.retry_budget_exhausted)
        self.retry_budget_for = ChildCache(self.retry_budget)
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


def _deployment_gauge(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    mode: Literal["livemax", "livesum"],
) -> Gauge:
    """A gauge per (model, deployment); ``mode`` combines the workers' values."""
    return Gauge(
        name,
        documentation,
        ["model", "deployment"],
        registry=registry,
        multiprocess_mode=mode,
    )
