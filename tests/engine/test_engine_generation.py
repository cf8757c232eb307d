"""Generation on the real model: determinism, seeds, stops, lengths, usage, batching."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import pytest

from sluice.engine.metrics import EngineMetrics
from sluice.engine.types import GenerationRequest, PromptTooLongError

from .conftest import chat_prompt, collect, needs_model

if TYPE_CHECKING:
    from sluice.engine.engine import Engine

pytestmark = [needs_model, pytest.mark.asyncio(loop_scope="module")]

QUESTION = "Name three colours of the rainbow."


async def test_chat_template_is_the_models_own(engine: Engine) -> None:
    text = engine.render_chat([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = engine.tokenize_chat([{"role": "user", "content": "Hi"}])
    # Special markers are single tokens, not spelled out.
    assert len(tokens) < len(text) // 3
    assert engine.detokenize(engine.tokenize("héllo 🙂", add_special=False)) == "héllo 🙂"


async def test_greedy_is_deterministic(engine: Engine) -> None:
    req = GenerationRequest(chat_prompt(engine, QUESTION), max_tokens=12, temperature=0.0)
    first, _ = await collect(engine, req)
    second, _ = await collect(engine, req)
    assert first
    assert first == second


async def test_seeds(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Tell me a story.")

    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt, max_tokens=12, temperature=1.5, seed=seed)

    a1, _ = await collect(engine, req(1))
    a2, _ = await collect(engine, req(1))
    b, _ = await collect(engine, req(2))
    assert a1 == a2
    assert a1 != b


async def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Write a long essay about the history of Rome.")
    _, events = await collect(engine, GenerationRequest(prompt, max_tokens=7, temperature=0.0))
    last = events[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.tokens == 7
    assert last.usage.prompt_tokens == len(prompt)
    assert all(e.finish_reason is None for e in events[:-1])


async def test_stop_string_is_never_emitted(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Count from one to twenty, separated by commas.")
    full, _ = await collect(engine, GenerationRequest(prompt, max_tokens=24, temperature=0.0))
    words = [w for w in full.split() if len(w) >= 3]
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[: full.index(stop)]
    text, events = await collect(
        engine, GenerationRequest(prompt, max_tokens=24, temperature=0.0, stop=[stop, "zzzz"])
    )
    assert text == expected
    assert stop not in text
    assert events[-1].finish_reason == "stop"
    assert events[-1].usage is not None
    assert events[-1].usage.completion_tokens < 24


async def test_eog_finishes_with_stop(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Reply with just the word yes.")
    text, events = await collect(engine, GenerationRequest(prompt, max_tokens=40, temperature=0.0))
    assert events[-1].finish_reason == "stop"
    assert "<|im_end|>" not in text
    assert events[-1].usage is not None
    assert events[-1].usage.completion_tokens < 40


async def test_context_overflow_is_refused(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Hi")
    with pytest.raises(PromptTooLongError):
        engine.generate(GenerationRequest(prompt, max_tokens=engine.n_ctx))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(GenerationRequest(prompt, max_tokens=0))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate(GenerationRequest([], max_tokens=4))


async def test_concurrent_requests_share_decode_steps(engine: Engine) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def observe(sequences: int, _prompt: int, _decoded: int) -> None:
        with lock:
            seen.append(sequences)

    engine.add_step_observer(observe)
    try:
        prompts = [chat_prompt(engine, f"Write a sentence about the number {i}.") for i in range(4)]
        results = await asyncio.gather(
            *(
                collect(engine, GenerationRequest(p, max_tokens=10, temperature=0.0))
                for p in prompts
            )
        )
    finally:
        engine.remove_step_observer(observe)
    assert all(events[-1].usage is not None for _, events in results)
    assert max(seen) > 1


async def test_concurrent_greedy_matches_sequential(engine: Engine) -> None:
    prompt = chat_prompt(engine, QUESTION)
    req = GenerationRequest(prompt, max_tokens=8, temperature=0.0)
    alone, _ = await collect(engine, req)
    together = await asyncio.gather(*(collect(engine, req) for _ in range(3)))
    assert [text for text, _ in together] == [alone] * 3


async def test_metrics_are_recorded(engine: Engine, metrics: EngineMetrics) -> None:
    await collect(engine, GenerationRequest(chat_prompt(engine, "Hi"), max_tokens=3))
    reg = metrics.registry
    assert (reg.get_sample_value("sluice_engine_generated_tokens_total") or 0) >= 3
    assert (reg.get_sample_value("sluice_engine_time_to_first_token_seconds_count") or 0) >= 1
    assert (reg.get_sample_value("sluice_engine_inter_token_latency_seconds_count") or 0) >= 2
    assert (reg.get_sample_value("sluice_engine_queue_time_seconds_count") or 0) >= 1
    assert (reg.get_sample_value("sluice_engine_batch_sequences_count") or 0) >= 3
    assert reg.get_sample_value("sluice_engine_step_seconds_count", {"phase": "prefill"})
    assert reg.get_sample_value("sluice_engine_step_seconds_count", {"phase": "decode"})
    assert reg.get_sample_value("sluice_engine_queue_depth") == 0
    assert reg.get_sample_value("sluice_engine_running_sequences") == 0
    assert (reg.get_sample_value("sluice_engine_requests_total", {"outcome": "length"}) or 0) >= 1
