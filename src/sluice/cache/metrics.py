"""The cache's Prometheus metrics (on the app's registry, beside `GatewayMetrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sluice.observability.metrics import ChildCache

_SIMILARITY_BUCKETS = (0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_cache_requests_total",
            "Requests the cache step saw, by served model and result (hit, semantic-hit, "
            "coalesced, miss, bypass).",
            ["model", "result"],
            registry=registry,
        )
        self.not_stored = Counter(
            "sluice_cache_not_stored_total",
            "Answers from upstream not stored, by reason (no_store, fallback, error, "
            "too_large, truncated, tool_calls).",
            ["reason"],
            registry=registry,
        )
        self.evictions = Counter(
            "sluice_cache_evictions_total",
            "Answers dropped from the memory tier to stay within its byte budget.",
            registry=registry,
        )
        self.bytes = Gauge(
            "sluice_cache_memory_bytes",
            "Bytes of answers held in the memory tier.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.entries = Gauge(
            "sluice_cache_memory_entries",
            "Answers held in the memory tier.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.similarity = Histogram(
            "sluice_cache_semantic_similarity",
            "Cosine similarity of the prompts of semantic hits.",
            buckets=_SIMILARITY_BUCKETS,
            registry=registry,
        )
        self.semantic_rejected = Counter(
            "sluice_cache_semantic_rejected_total",
            "Candidates above the similarity threshold that the second check turned down, by "
            "the signal that differed (number, entity, negation, direction, words).",
            ["reason"],
            registry=registry,
        )
        self._requests_for = ChildCache(self.requests)
        self._not_stored_for = ChildCache(self.not_stored)
        self._rejected_for = ChildCache(self.semantic_rejected)

    def result(self, model: str, result: str) -> None:
        self._requests_for(model, result).inc()

    def skipped(self, reason: str) -> None:
        self._not_stored_for(reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected_for(reason).inc()

    def stored(self, size: int, entries: int) -> None:
        self.bytes.set(size)
        self.entries.set(entries)

    def evicted(self, count: int) -> None:
        self.evictions.inc(count)
