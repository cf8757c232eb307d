"""Prometheus metrics for the local engine, registered on a registry the caller owns.

The decode thread updates these directly (prometheus_client is thread-safe). Rates such as
tokens per second come from PromQL, e.g. ``rate(sluice_engine_generated_tokens_total[1m])``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class EngineShare:
    """One engine's part of the process-wide gauges (queue, running sequences, KV cells).

    Every local deployment of a process shares one `EngineMetrics`: setting a gauge would
    let the engine that wrote last hide the others. Each engine adds the change of its own
    value instead, so the gauges read the sum of the engines (and, livesum, of the workers),
    and `clear` takes a closed engine's part out. Each name is written from one thread (the
    admission lock's holder, or the decode thread)."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._gauges = {
            "queue_depth": metrics.queue_depth,
            "running_sequences": metrics.running_sequences,
            "kv_cells": metrics.kv_cells,
            "kv_cells_used": metrics.kv_cells_used,
        }
        self._values = dict.fromkeys(self._gauges, 0.0)

    def set(self, name: str, value: float) -> None:
        change = value - self._values[name]
        if change:
            self._values[name] = value
            self._gauges[name].inc(change)

    def clear(self) -> None:
        for name in self._gauges:
            self.set(name, 0.0)


class EngineMetrics:
    """The engine's instruments, all prefixed ``sluice_engine_``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_depth = Gauge(
            "sluice_engine_queue_depth",
            "Requests waiting for a free sequence slot.",
            registry=registry,
            multiprocess_mode="livesum",  # workers' queues add up; exited ones drop out
        )
        self.running_sequences = Gauge(
            "sluice_engine_running_sequences",
            "Sequences holding a slot (prefilling or decoding).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.kv_cells = Gauge(
            "sluice_engine_kv_cells",
            "KV cache cells (tokens) the context holds: slots times tokens per slot.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.kv_cells_used = Gauge(
            "sluice_engine_kv_cells_used",
            "KV cache cells holding tokens after the last step: running sequences' and "
            "the prompt cache's kept ones.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.batch_sequences = Histogram(
            "sluice_engine_batch_sequences",
            "Sequences in one decode step's batch.",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "sluice_engine_batch_tokens",
            "Tokens (prompt chunks plus decoded tokens) in one decode step's batch.",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "sluice_engine_generated_tokens",
            "Completion tokens sampled.",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "sluice_engine_prompt_tokens",
            "Prompt tokens prefilled.",
            registry=registry,
        )
        self.prompt_tokens_reused = Counter(
            "sluice_engine_prompt_tokens_reused",
            "Prompt tokens found in a slot's kept KV cache, so not prefilled again.",
            registry=registry,
        )
        self.requests = Counter(
            "sluice_engine_requests",
            "Requests finished, by outcome (stop, length, cancelled, error).",
            ["outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "sluice_engine_rejected",
            "Requests refused before admission, by reason (queue_full, queue_timeout).",
            ["reason"],
            registry=registry,
        )
        self.queue_time = Histogram(
            "sluice_engine_queue_time_seconds",
            "Time from submission to admission into a slot.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "sluice_engine_time_to_first_token_seconds",
            "Time from submission to the first sampled token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "sluice_engine_inter_token_latency_seconds",
            "Time between consecutive sampled tokens of one sequence.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.step_time = Histogram(
            "sluice_engine_step_seconds",
            "Wall time of one llama_decode step, by phase: prefill (prompt tokens only), "
            "decode (sampled tokens only) or mixed.",
            ["phase"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        )

    def observe_step(
        self,
        *,
        sequences: int,
        prompt_tokens: int,
        decode_tokens: int,
        seconds: float,
        kv_cells_used: int,
        share: EngineShare,
    ) -> None:
        """Record one decode step (``share``: the engine's part of the gauges)."""
        share.set("kv_cells_used", kv_cells_used)
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(prompt_tokens + decode_tokens)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if prompt_tokens and decode_tokens:
            phase = "mixed"
        elif prompt_tokens:
            phase = "prefill"
        else:
            phase = "decode"
        self.step_time.labels(phase).observe(seconds)
