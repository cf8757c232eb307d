"""Raw llama.cpp batched decode vs Sluice's engine, tokens/s at several batch widths.

    python bench/engine_raw.py [--threads 2] [--batches 1,4,16] [--tokens 64]

"raw" drives llama-cpp-python's low-level API directly: one context with B sequence
slots, every sequence prefilled with the same chat prompt, then `--tokens` steps of one
`llama_decode` over B tokens with greedy sampling. "engine" runs B concurrent greedy
requests of `--tokens` tokens through `sluice.engine.Engine` (prefill included, as a
client sees it). Both use the packaged SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from typing import Any

import llama_cpp

from sluice.engine import Engine, EngineConfig, GenerationRequest
from sluice.engine.model import LlamaModel, default_model_path

PROMPT = [{"role": "user", "content": "Write a long story about a river and a mill."}]


def raw_tokens_per_s(width: int, tokens: int, threads: int, n_ctx: int) -> tuple[float, float]:
    """(decode-only tokens/s, decode+sampling tokens/s) for `width` parallel sequences."""
    model = LlamaModel(
        default_model_path(), n_ctx=n_ctx, n_batch=512, n_seq=width, n_threads=threads
    )
    prompt = model.tokenize_chat(PROMPT)
    batch: Any = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = [llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())]
    samplers = []
    for _ in range(width):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        samplers.append(chain)
    try:
        # Prefill each sequence (not timed).
        for s in range(width):
            for i, tok in enumerate(prompt):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = s
                batch.logits[i] = 1 if i == len(prompt) - 1 else 0
            batch.n_tokens = len(prompt)
            assert llama_cpp.llama_decode(model.ctx, batch) == 0
        last = [llama_cpp.llama_sampler_sample(samplers[s], model.ctx, -1) for s in range(width)]
        # Decode steps of `width` tokens each.
        decode_s = 0.0
        started = time.perf_counter()
        for step in range(tokens):
            for s in range(width):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = last[s], len(prompt) + step, 1
                batch.seq_id[s][0] = s
                batch.logits[s] = 1
            batch.n_tokens = width
            t0 = time.perf_counter()
            assert llama_cpp.llama_decode(model.ctx, batch) == 0
            decode_s += time.perf_counter() - t0
            last = [llama_cpp.llama_sampler_sample(samplers[s], model.ctx, s) for s in range(width)]
        total_s = time.perf_counter() - started
        return width * tokens / decode_s, width * tokens / total_s
    finally:
        for chain in samplers:
            llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        model.close()


async def engine_tokens_per_s(width: int, tokens: int, threads: int, n_ctx: int) -> float:
    engine = Engine(EngineConfig(n_ctx=n_ctx, parallel=width, threads=threads))
    await engine.start()
    try:
        prompt = engine.tokenize_chat(PROMPT)

        async def one() -> int:
            n = 0
            async for event in engine.generate(
                GenerationRequest(prompt, max_tokens=tokens, temperature=0.0)
            ):
                n = event.tokens
            return n

        await one()  # warm-up
        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(width)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=256)
    args = parser.parse_args()
    widths = [int(w) for w in args.batches.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, llama-cpp-python "
        f"{llama_cpp.__version__}, threads={args.threads}, tokens/seq={args.tokens}"
    )
    print("| sequences | raw decode tok/s | raw decode+sample tok/s | engine tok/s | engine/raw |")
    print("|---:|---:|---:|---:|---:|")
    for width in widths:
        dec, full = raw_tokens_per_s(width, args.tokens, args.threads, args.n_ctx)
        eng = asyncio.run(engine_tokens_per_s(width, args.tokens, args.threads, args.n_ctx))
        print(f"| {width} | {dec:.1f} | {full:.1f} | {eng:.1f} | {eng / full:.2f} |")


if __name__ == "__main__":
    main()
