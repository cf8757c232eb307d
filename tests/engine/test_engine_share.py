"""Two engines in one process share the gauges: each adds its own part, and a closed one
takes its part out (no llama.cpp needed)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sluice.engine.metrics import EngineMetrics, EngineShare


def test_two_engines_add_up_and_a_closed_one_leaves() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    first, second = EngineShare(metrics), EngineShare(metrics)
    first.set("queue_depth", 3)
    second.set("queue_depth", 2)
    first.set("kv_cells", 1024)
    second.set("kv_cells", 2048)
    first.set("queue_depth", 1)  # its queue shrank: the other's part stays
    assert registry.get_sample_value("sluice_engine_queue_depth") == 3
    assert registry.get_sample_value("sluice_engine_kv_cells") == 3072
    second.clear()
    assert registry.get_sample_value("sluice_engine_queue_depth") == 1
    assert registry.get_sample_value("sluice_engine_kv_cells") == 1024
