"""Slots, queueing and shutdown on the real model: cancellation, overflow, priority."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from sluice.engine.types import (
    EngineClosedError,
    GenerationRequest,
    QueueFullError,
    QueueTimeoutError,
)

from .conftest import chat_prompt, collect, needs_model, small_config

if TYPE_CHECKING:
    from sluice.engine.engine import Engine

pytestmark = [needs_model, pytest.mark.asyncio(loop_scope="module")]

LONG = "Write a very long essay about the history of the Roman empire."


async def wait_all_free(engine: Engine, within_s: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        stats = engine.stats()
        if stats.free_slots == stats.slots and stats.running == 0 and stats.waiting == 0:
            return
        assert loop.time() < deadline, f"slots not freed: {stats}"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture(loop_scope="module")
async def single_slot() -> AsyncIterator[Engine]:
    """An engine with one slot, a one-place queue and a short queue timeout."""
    from sluice.engine.engine import Engine

    eng = Engine(small_config(parallel=1, max_queue=1, max_queue_wait_s=0.5))
    await eng.start()
    yield eng
    await eng.close()


async def test_abandoned_streams_free_their_slots(engine: Engine) -> None:
    prompt = chat_prompt(engine, LONG)
    streams = [
        engine.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
        for _ in range(4)
    ]
    for stream in streams[:2]:
        await stream.__anext__()  # running and producing
    assert engine.stats().running >= 1
    for stream in streams:
        await stream.aclose()
    await wait_all_free(engine)


async def test_cancelled_consumer_task_frees_its_slot(engine: Engine) -> None:
    prompt = chat_prompt(engine, LONG)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0)):
            started.set()

    tasks = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.wait_for(started.wait(), 10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_all_free(engine)


async def test_dropped_generator_frees_its_slot(engine: Engine) -> None:
    prompt = chat_prompt(engine, LONG)

    async def start_and_drop() -> None:
        stream = engine.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
        await stream.__anext__()
        # the stream goes out of scope without aclose()

    await start_and_drop()
    await wait_all_free(engine)


async def test_queue_overflow_is_refused_at_once(single_slot: Engine) -> None:
    prompt = chat_prompt(single_slot, LONG)
    running = single_slot.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
    await running.__anext__()
    queued = single_slot.generate(GenerationRequest(prompt, max_tokens=2))
    assert single_slot.stats().waiting == 1
    with pytest.raises(QueueFullError):
        single_slot.generate(GenerationRequest(prompt, max_tokens=2))
    await running.aclose()
    events = [e async for e in queued]
    assert events[-1].finish_reason == "length"
    await wait_all_free(single_slot)


async def test_queue_wait_times_out(single_slot: Engine) -> None:
    prompt = chat_prompt(single_slot, LONG)
    running = single_slot.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
    await running.__anext__()
    queued = single_slot.generate(GenerationRequest(prompt, max_tokens=2))
    with pytest.raises(QueueTimeoutError):
        await asyncio.wait_for(queued.__anext__(), 5)
    await running.aclose()
    await wait_all_free(single_slot)


async def test_higher_priority_is_admitted_first() -> None:
    from sluice.engine.engine import Engine

    eng = Engine(small_config(parallel=1, max_queue=4))
    await eng.start()
    try:
        prompt = chat_prompt(eng, LONG)
        blocker = eng.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
        await blocker.__anext__()
        order: list[str] = []

        async def run(name: str, priority: int) -> None:
            req = GenerationRequest(prompt, max_tokens=1, priority=priority)
            await collect(eng, req)
            order.append(name)

        low = asyncio.create_task(run("low", 0))
        await asyncio.sleep(0.01)
        high = asyncio.create_task(run("high", 5))
        await asyncio.sleep(0.05)
        assert eng.stats().waiting == 2
        await blocker.aclose()
        await asyncio.gather(low, high)
        assert order == ["high", "low"]
    finally:
        await eng.close()


async def test_chunked_prefill_keeps_decoding() -> None:
    from sluice.engine.engine import Engine

    eng = Engine(small_config(parallel=2, prefill_chunk=16))
    await eng.start()
    steps: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def observe(sequences: int, prompt: int, decoded: int) -> None:
        with lock:
            steps.append((sequences, prompt, decoded))

    eng.add_step_observer(observe)
    try:
        short = chat_prompt(eng, LONG)  # greedy: runs far past 40 tokens
        long = chat_prompt(eng, LONG + " " + "Mention every emperor by name. " * 12)
        first = eng.generate(GenerationRequest(short, max_tokens=40, temperature=0.0))
        await first.__anext__()
        _, events = await collect(eng, GenerationRequest(long, max_tokens=2))
        await first.aclose()
    finally:
        await eng.close()
    assert events[-1].usage is not None
    assert events[-1].usage.prompt_tokens == len(long)
    assert all(prompt <= 16 for _, prompt, _ in steps)
    mixed = [s for s in steps if s[1] and s[2]]
    assert len(mixed) >= 3, steps  # the long prompt was prefilled beside a running decode


async def test_close_fails_in_flight_and_refuses_new_work() -> None:
    from sluice.engine.engine import Engine

    eng = Engine(small_config(parallel=1))
    await eng.start()
    prompt = chat_prompt(eng, LONG)
    running = eng.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
    await running.__anext__()
    queued = eng.generate(GenerationRequest(prompt, max_tokens=5))
    await eng.close()
    with pytest.raises(EngineClosedError):
        async for _ in running:
            pass
    with pytest.raises(EngineClosedError):
        await queued.__anext__()
    with pytest.raises(EngineClosedError):
        eng.generate(GenerationRequest(prompt, max_tokens=5))
    await eng.close()  # idempotent
