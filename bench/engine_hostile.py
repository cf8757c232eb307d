"""How long hostile requests to the embedded engine hold the event loop, and tokenizing's cost.

    python bench/engine_hostile.py [--threads 1] [--context 2048]

A ticker coroutine wakes every millisecond while a `LocalBackend` (the packaged SmolLM2)
answers each hostile request; the table gives the longest gap between two ticks (the
event loop's longest stall) and how long the request took to be answered (refused, most
of them). Then the cost of tokenizing text of several sizes, inline and through a worker
thread, which sets `sluice.backends.local.INLINE_CHARS`. Only the public backend API is
used, so the same script measures an older checkout (PYTHONPATH=that/src).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from sluice.backends.base import UpstreamCall
from sluice.backends.local import LocalBackend
from sluice.engine.config import EngineConfig

SENTENCE = "the quick brown fox jumps over the lazy dog while rivers run to the sea "


def text(chars: int) -> str:
    return (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]


async def stall(
    backend: LocalBackend, route: str, body: dict[str, Any]
) -> tuple[float, float, str]:
    """(longest loop stall, time to answer, outcome) for one request."""
    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    try:
        await backend.send(UpstreamCall(route, {"model": "m", **body}, None, "bench"))  # type: ignore[arg-type]
        outcome = "200"
    except Exception as exc:
        outcome = f"{type(exc).__name__}"
    took = time.perf_counter() - started
    await asyncio.sleep(0.01)  # the ticker's next wake-up measures a stall that just ended
    ticker.cancel()
    return longest, took, outcome


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    backend = LocalBackend("bench", EngineConfig(n_ctx=args.context, threads=args.threads))
    await backend.start()
    try:
        big = text(160_000)  # just under context x the longest token (81 bytes) at 2048
        cases = {
            "2,000 prompts x n=128": ("completions", {"prompt": ["x"] * 2000, "n": 128}),
            "16 prompts of 160k chars": ("completions", {"prompt": [big] * 16, "max_tokens": 1}),
            "chat, one 160k-char message": (
                "chat/completions",
                {"messages": [{"role": "user", "content": big}], "max_tokens": 1},
            ),
            "chat, 14,500 special tokens": (
                "chat/completions",
                {"messages": [{"role": "user", "content": "a<|im_end|>" * 14_500}]},
            ),
            "chat, 2,048 empty messages": (
                "chat/completions",
                {"messages": [{"role": "user", "content": ""}] * 2048, "max_tokens": 1},
            ),
        }
        print(f"{'request':32} {'loop stall':>11} {'answered in':>12}  outcome")
        for name, (route, body) in cases.items():
            longest, took, outcome = await stall(backend, route, body)
            print(f"{name:32} {longest * 1e3:9.1f} ms {took * 1e3:9.1f} ms  {outcome}")

        engine = backend.engine
        print(f"\n{'tokenize':>12} {'tokens':>7} {'inline':>10} {'to_thread':>10}")
        for chars in (100, 500, 2000, 10_000, 160_000):
            sample = text(chars)
            runs = 200 if chars <= 2000 else 20
            inline, threaded = [], []
            for _ in range(runs):
                t = time.perf_counter()
                tokens = engine.tokenize(sample)
                inline.append(time.perf_counter() - t)
                t = time.perf_counter()
                await asyncio.to_thread(engine.tokenize, sample)
                threaded.append(time.perf_counter() - t)
            print(
                f"{chars:>8} chr {len(tokens):>7} {statistics.median(inline) * 1e6:8.0f}us"
                f" {statistics.median(threaded) * 1e6:8.0f}us"
            )
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
