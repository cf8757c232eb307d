"""Raw llama.cpp batched decode vs Sluice's engine, tokens/s at several batch widths.

    python bench/engine_raw.py [--threads 2] [--batches 1,4,16] [--tokens 64]

"raw" drives llama-cpp-python's low-level API directly, with no Python around it beyond
filling the batch: one context with B sequence slots, all B prompts prefilled together,
then one `llama_decode` of B tokens per step with greedy sampling. "raw steady" counts the
decode steps only; "raw end-to-end" includes the prefill. "engine" runs B concurrent greedy
requests of `--tokens` tokens through `sluice.engine.Engine` and counts from submission to
the last event (prefill included, as a client sees it), so engine/raw compares like with
like against "raw end-to-end". On a busy host the raw/engine ratio is noisy (llama.cpp's
OpenMP threads stall when other processes take a core); the last column, the share of the
engine's wall time spent inside `llama_decode`, is the robust measure of its own overhead.
Both use the packaged SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from typing import Any

import llama_cpp
from prometheus_client import CollectorRegistry

from sluice.engine import Engine, EngineConfig, EngineMetrics, GenerationRequest
from sluice.engine.model import LlamaModel, default_model_path

PROMPT = [{"role": "user", "content": "Write a long story about a river and a mill."}]


def raw_tokens_per_s(width: int, tokens: int, threads: int, n_ctx: int) -> tuple[float, float]:
    """(steady decode+sample tok/s, end-to-end tok/s incl. prefill) for `width` sequences."""
    model = LlamaModel(
        default_model_path(), n_ctx=n_ctx, n_batch=512, n_seq=width, n_threads=threads
    )
    prompt = model.tokenize_chat(PROMPT)
    batch: Any = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = []
    for _ in range(width):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        samplers.append(chain)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        assert llama_cpp.llama_decode(model.ctx, batch) == 0

    try:
        started = time.perf_counter()
        # Prefill every sequence, packing as many prompts per llama_decode as fit.
        entries = [
            (tok, i, s, i == len(prompt) - 1) for s in range(width) for i, tok in enumerate(prompt)
        ]
        last: list[int] = []
        for lo in range(0, len(entries), 512):
            chunk = entries[lo : lo + 512]
            decode(chunk)
            for k, (_, _, s, wants_logits) in enumerate(chunk):
                if wants_logits:
                    last.append(llama_cpp.llama_sampler_sample(samplers[s], model.ctx, k))
        decode_started = time.perf_counter()
        for step in range(tokens - 1):
            decode([(last[s], len(prompt) + step, s, True) for s in range(width)])
            last = [llama_cpp.llama_sampler_sample(samplers[s], model.ctx, s) for s in range(width)]
        done = time.perf_counter()
        steady = width * (tokens - 1) / (done - decode_started)
        return steady, width * tokens / (done - started)
    finally:
        for chain in samplers:
            llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        model.close()


async def engine_tokens_per_s(
    width: int, tokens: int, threads: int, n_ctx: int
) -> tuple[float, float]:
    """(tokens/s, share of the wall time spent inside llama_decode) for `width` requests."""
    registry = CollectorRegistry()
    engine = Engine(
        EngineConfig(n_ctx=n_ctx, parallel=width, threads=threads), EngineMetrics(registry)
    )
    await engine.start()

    def decode_seconds() -> float:
        return sum(
            registry.get_sample_value("sluice_engine_step_seconds_sum", {"phase": phase}) or 0.0
            for phase in ("prefill", "decode", "mixed")
        )

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
        before = decode_seconds()
        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(width)))
        wall = time.perf_counter() - started
        return sum(counts) / wall, (decode_seconds() - before) / wall
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (noisy hosts)")
    args = parser.parse_args()
    widths = [int(w) for w in args.batches.split(",")]
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, llama-cpp-python "
        f"{llama_cpp.__version__}, threads={args.threads}, tokens/seq={args.tokens}, "
        f"best of {args.repeat}"
    )
    print(
        "| sequences | raw steady tok/s | raw end-to-end tok/s | engine tok/s | engine/raw "
        "| engine time in llama_decode |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for width in widths:
        runs = [
            raw_tokens_per_s(width, args.tokens, args.threads, args.n_ctx)
            for _ in range(args.repeat)
        ]
        steady, e2e = max(r[0] for r in runs), max(r[1] for r in runs)
        eng, share = max(
            asyncio.run(engine_tokens_per_s(width, args.tokens, args.threads, args.n_ctx))
            for _ in range(args.repeat)
        )
        print(
            f"| {width} | {steady:.1f} | {e2e:.1f} | {eng:.1f} | {eng / e2e:.2f} | {share:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
