"""The batch workers' Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter(
            "sluice_batch_lines_total",
            "Batch lines this process answered, by result (done: HTTP 200; failed).",
            ["result"],
            registry=registry,
        )
        self.open_lines = Gauge(
            "sluice_batch_open_lines",
            "Lines of unfinished batches by batch status and line state (queued, running, "
            "done, failed, cancelled, expired), as the database holds them.",
            ["status", "state"],
            registry=registry,
            multiprocess_mode="livemax",  # every process reads the same database
        )
        self.lease_expiries = Counter(
            "sluice_batch_lease_expiries_total",
            "Running lines queued again because their lease ran out (their worker died).",
            registry=registry,
        )
        self.lost_leases = Counter(
            "sluice_batch_lost_leases_total",
            "Answers not written because the line's lease had passed to another worker.",
            registry=registry,
        )
        self.requeued = Counter(
            "sluice_batch_requeued_total",
            "Lines given back to the queue because the gateway refused them for now (a "
            "key's limit, a full deployment).",
            registry=registry,
        )
        self.batches = Counter(
            "sluice_batches_total",
            "Batches this process created, failed at validation, or finalised.",
            ["event"],
            registry=registry,
        )
        self._published: set[tuple[str, str]] = set()

    def publish(self, counts: dict[tuple[str, str], int]) -> None:
        for labels in self._published - set(counts):
            self.open_lines.labels(*labels).set(0)
        for labels, count in counts.items():
            self.open_lines.labels(*labels).set(count)
        self._published = set(counts)
