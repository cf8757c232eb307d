"""What a decode step costs, measured on raw llama.cpp with the packaged model: the figures
the engine's scheduler is tuned on (engine/budget.py, engine/scheduler.py; docs/benchmarks.md,
"Second round", and docs/architecture.md).

1. step time against tokens: n sequences decoding one token each; one prompt of n tokens;
2. a prompt chunk's depth: 8 decodes beside 8 prompt tokens at position 0 to 900;
3. a copy of one slot's KV stream into another (llama_memory_seq_cp) inside the next step;
4. llama.cpp's samplers per token: greedy, top_p without and with top_k first (on the logits
   of a made-up context, whose flat distribution is top_p's worst case: on real text top_p
   alone cost 0.7 ms a token at c=16, docs/benchmarks.md).

    taskset -c 0,1 python bench/engine_costs.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
from engine_bench import model_path

from sluice.engine.model import LlamaModel
from sluice.engine.sequence import make_sampler
from sluice.engine.types import GenerationRequest

Entry = tuple[int, int, int, bool]  # token, position, sequence, wants logits


class Probe:
    def __init__(self, threads: int) -> None:
        self.model = LlamaModel(model_path(), n_ctx=1024, n_batch=512, n_seq=16, n_threads=threads)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, entries: list[Entry]) -> float:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        started = time.perf_counter()
        if llama_cpp.llama_decode(self.model.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    def trim(self, seqs: range, keep: int) -> None:
        for s in seqs:
            llama_cpp.llama_memory_seq_rm(self.model.memory, s, keep, -1)

    def fill(self, seq: int, tokens: int) -> None:
        for lo in range(0, tokens, 500):
            n = min(500, tokens - lo)
            self.decode([(100 + i % 50, lo + i, seq, False) for i in range(n)])


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 1)


def timed(run: Callable[[], Any], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    p = Probe(args.threads)
    for s in range(16):
        p.fill(s, 150)
    print("| decode step | ms |\n|---|---:|")
    for n in (1, 2, 4, 8, 16):
        t = []
        for _ in range(9):
            t.append(p.decode([(200, 150, s, True) for s in range(n)]))
            p.trim(range(16), 150)
        print(f"| {n} sequences, one token each | {ms(t)} |")
    for n in (16, 64, 256, 512):
        t = []
        for _ in range(5):
            p.trim(range(1), 150)
            t.append(p.decode([(300 + i % 50, 150 + i, 0, i == n - 1) for i in range(n)]))
        print(f"| one prompt of {n} tokens | {ms(t)} ({ms(t) / n:.2f} a token) |")
    p.trim(range(1), 150)
    llama_cpp.llama_memory_seq_rm(p.model.memory, 8, -1, -1)
    p.fill(8, 1000)
    alone = []
    for _ in range(9):
        alone.append(p.decode([(200, 150, s, True) for s in range(8)]))
        p.trim(range(8), 150)
    print(f"| 8 decodes alone | {ms(alone)} |")
    for depth in (900, 500, 100, 0):  # deepest first: each trims the prompt to its depth
        t = []
        for _ in range(7):
            llama_cpp.llama_memory_seq_rm(p.model.memory, 8, depth, -1)
            chunk = [(300 + i, depth + i, 8, i == 7) for i in range(8)]
            t.append(p.decode([(200, 150, s, True) for s in range(8)] + chunk))
            p.trim(range(8), 150)
        print(f"| 8 decodes + 8 prompt tokens at position {depth} | {ms(t)} |")
    llama_cpp.llama_memory_seq_rm(p.model.memory, 8, -1, -1)
    p.fill(8, 150)
    plain, copied = [], []
    step = [(200, 150, s, True) for s in range(16)]
    for _ in range(9):
        plain.append(p.decode(step))
        p.trim(range(16), 150)
        llama_cpp.llama_memory_seq_rm(p.model.memory, 15, -1, -1)
        llama_cpp.llama_memory_seq_cp(p.model.memory, 0, 15, 0, -1)
        copied.append(p.decode(step))
        p.trim(range(16), 150)
    print(f"| 16 decodes, one slot's stream copied before it (1,024 cells) | {ms(copied)} "
          f"(plain {ms(plain)}) |")  # fmt: skip
    p.decode(step)  # logits for the samplers
    print("\n| sampler | µs a token |\n|---|---:|")
    for temperature, top_p, top_k in ((0.0, 1.0, 0), (0.2, 0.9, 0), (0.2, 0.9, 50), (1.0, 1.0, 0)):
        req = GenerationRequest([1], temperature=temperature, top_p=top_p, top_k=top_k)
        chain = make_sampler(req)
        t = timed(lambda c=chain: llama_cpp.llama_sampler_sample(c, p.model.ctx, 3), 200)
        llama_cpp.llama_sampler_free(chain)
        us = statistics.median(t) * 1e6
        print(f"| temperature {temperature}, top_p {top_p}, top_k {top_k} | {us:.0f} |")
    llama_cpp.llama_batch_free(p.batch)
    p.model.close()


if __name__ == "__main__":
    main()
