#!/usr/bin/env python3
"""Core gateway benchmark: direct (nginx mock) vs Sluice vs LiteLLM proxy.

Runs in one go on a 2-core machine:

* mock upstream: nginx (1 worker, access_log off) on 127.0.0.1:9100, pinned to
  core 1, answering POST /v1/chat/completions with a fixed chat.completion JSON
  body and POST /stream/v1/chat/completions with a fixed SSE body;
* targets, each measured the same way:
    direct  -- the load generator talks to nginx itself;
    sluice  -- `sluice serve` (1 worker, access log + metrics on), core 0;
    litellm -- LiteLLM proxy (1 worker, master key, no DB), core 0;
* load generator: wrk (1 thread) pinned to core 1, sharing it with nginx;
  the TTFT client (asyncio + aiohttp, in this process) also on core 1.

Measurements per target: non-streaming p50/p99 latency at concurrency 1,
requests/s at concurrency 32 and 64 (wrk), and streaming time-to-first-token
(send -> first "data:" line) over N sequential requests. Overheads are
target minus direct.

Usage (from the repo root, with the sluice venv active):

    python bench/gateway_bench.py [--duration 10] [--skip-litellm]
                                  [--skip-sluice] [--write-docs] [--profile]
                                  [--nice -10] [--noise-budget 180]

The LiteLLM venv (bench/.work/litellm-venv) is created on first use. On a
machine shared with other work, the script measures the CPU used by processes
outside its own process groups during every run, waits for quiet / repeats
disturbed runs within --noise-budget seconds, and flags what stays disturbed.
Logs, rendered configs, raw JSON results and profiles go to bench/.work/gateway/.

Only the Python 3.11 standard library plus aiohttp (in the sluice venv) is
used. Every process started is put in its own process group and killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK = BENCH / ".work"
# This script's own logs, rendered configs, results and profiles (other bench
# scripts share bench/.work, so keep to a subdirectory).
OUT = WORK / "gateway"
DOCS = REPO / "docs" / "benchmarks.md"

HOST = "127.0.0.1"
DEFAULT_NGINX_PORT = 9100
# Overridable with --nginx-port/--sluice-port/--litellm-port (main() rebinds these).
NGINX_PORT = DEFAULT_NGINX_PORT
SLUICE_PORT = 8080
LITELLM_PORT = 4000

GATEWAY_CORE = "0"  # the gateway under test gets core 0 to itself
AUX_CORE = "1"  # nginx mock + wrk + this script (TTFT client) share core 1

# --nice N runs nginx, the gateway, wrk and the TTFT client at this nice value.
NICE = 0


def pin(core: str) -> list[str]:
    """Command prefix: pin to one core (and renice when --nice is given)."""
    return ["taskset", "-c", core] + (["nice", "-n", str(NICE)] if NICE else [])


MASTER_KEY = "sk-bench-master"
UPSTREAM_KEY = "sk-upstream"
LITELLM_VERSION = "1.109.1"
LITELLM_VENV = WORK / "litellm-venv"
TOOLS_VENV = WORK / "tools-venv"

# Targets from the Sluice plan.
TARGET_P50_OVERHEAD_MS = 0.5
TARGET_RPS_C32 = 3000.0
# Report a run as noisy when processes outside the benchmark used this much CPU.
FOREIGN_CPU_WARN_PCT = 5.0
# Before each measured run, wait (up to --quiet-wait s) until they use less than this.
QUIET_PCT = 10.0


MODEL = "gpt-4o-mini"
STREAM_MODEL = "gpt-4o-mini-stream"
REPLY_WORDS = ["Hello", "!", " This", " is", " a", " fixed", " benchmark", " reply", "."]
REPLY_TEXT = "".join(REPLY_WORDS)

# What the accounting benchmarks' variants without auth are sent as their key: every variant
# gets the same requests, an Authorization header included (OpenAI's SDKs always send one),
# which a gateway without auth ignores. As long as a virtual key; never stored or checked.
PLAIN_CLIENT_KEY = "sk-sluice-" + "x" * 38

REQUEST_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    },
    separators=(",", ":"),
)
STREAM_REQUEST_BODY = json.dumps(
    {
        "model": STREAM_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
    },
    separators=(",", ":"),
)


class BenchError(RuntimeError):
    """A fatal, clearly explained benchmark failure."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Mock upstream bodies
# --------------------------------------------------------------------------


def chat_completion_body() -> str:
    body = {
        "id": "chatcmpl-bench0000000000000000000001",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY_TEXT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
    }
    return json.dumps(body, separators=(",", ":"))


def sse_body() -> str:
    """~10 chat.completion.chunk events followed by data: [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        c = {
            "id": "chatcmpl-bench0000000000000000000002",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return "data: " + json.dumps(c, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": w}, None) for w in REPLY_WORDS]
    events.append(chunk({}, "stop"))
    events.append("data: [DONE]\n\n")
    return "".join(events)


def nginx_quote(s: str) -> str:
    """Escape a string for a single-quoted nginx config parameter."""
    if "$" in s:
        raise ValueError("nginx would treat '$' as a variable")
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


# --------------------------------------------------------------------------
# Process handling
# --------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-20000:].decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        return "\n".join(data.splitlines()[-lines:])


OUR_PGIDS: set[int] = set()


def our_pgids() -> set[int]:
    return OUR_PGIDS | {os.getpgrp()}


class ProcessManager:
    """Starts processes in their own process groups; kills all of them on exit."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> Proc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(log_path, "wb")  # noqa: SIM115 - owned by the child
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,  # own process group: killpg gets the children too
            )
        except FileNotFoundError as e:
            raise BenchError(f"{name}: cannot start {argv[0]!r}: {e}") from e
        finally:
            logf.close()
        proc = Proc(name, argv, log_path, popen)
        self.procs.append(proc)
        OUR_PGIDS.add(popen.pid)
        log(f"started {name} (pid {popen.pid}): {shlex.join(argv)}")
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        pgid = proc.popen.pid  # == pid, thanks to start_new_session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{proc.name} did not exit after SIGTERM; killing")
        # Kill whatever is left in the group (uvicorn/gunicorn workers, nginx worker).
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
            except Exception as e:  # keep cleaning up the rest
                log(f"error stopping {proc.name}: {e}")


def _raise_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def wait_for_idle(max_wait: float) -> str | None:
    """Wait (up to max_wait s) until the machine is quiet; return a warning if it never is."""
    deadline = time.monotonic() + max_wait
    while True:
        snap0, t0, c0 = proc_cpu_snapshot(), time.monotonic(), cpu_times()
        time.sleep(2.0)
        busy = cpu_busy_pct(c0, cpu_times())
        _, top = foreign_cpu(snap0, proc_cpu_snapshot(), our_pgids(), time.monotonic() - t0)
        if max(busy) < 10.0:
            return None
        state = " / ".join(f"{b:.0f}%" for b in busy)
        if time.monotonic() >= deadline:
            return f"machine not idle at start: cores busy {state} ({', '.join(top)})"
        log(f"machine busy (cores {state}; {', '.join(top)}); waiting for it to calm down")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def require_ports(ports: dict[str, int]) -> None:
    busy = [f"{name} port {port}" for name, port in ports.items() if not port_free(port)]
    if busy:
        raise BenchError(
            "ports already in use on 127.0.0.1: "
            + ", ".join(busy)
            + " -- stop whatever listens there (e.g. `ss -ltnp`) and retry"
        )


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str,
    url: str,
    body: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url, data=body.encode() if body is not None else None, method=method
    )
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with _NO_PROXY_OPENER.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_ready(proc: Proc, url: str, timeout: float) -> float:
    """Poll url until it answers 200; fail with the log tail otherwise."""
    t0 = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - t0 < timeout:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with code {proc.popen.returncode} before becoming ready "
                f"({url}).\n--- last lines of {proc.log_path} ---\n{proc.log_tail()}"
            )
        try:
            status, _, _ = http("GET", url, timeout=2.0)
            if status == 200:
                return time.monotonic() - t0
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} not ready after {timeout:.0f}s at {url} (last: {last}).\n"
        f"--- last lines of {proc.log_path} ---\n{proc.log_tail()}"
    )


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _to_ms(v: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v.strip())
    if not m:
        raise ValueError(f"cannot parse wrk time {v!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def wrk_percentiles(out: str) -> dict[str, float]:
    """The latency distribution of wrk --latency's output: {"50": ms, "75": …, "99": …}."""
    return {p: _to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M)}


@dataclass
class WrkResult:
    conns: int
    duration_s: int
    requests: int
    rps: float
    non2xx: int
    socket_errors: dict[str, int]
    lat_avg_ms: float
    lat_max_ms: float
    percentiles_ms: dict[str, float]
    argv: str
    raw: str
    foreign_cpu_pct: float = 0.0
    foreign_top: list[str] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                vals = [int(x) for x in line.split()[1:]]
                idle = vals[3] + vals[4]
                out.append((sum(vals) - idle, sum(vals)))
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_snapshot() -> dict[int, tuple[int, int, str]]:
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


def foreign_cpu(
    before: dict[int, tuple[int, int, str]],
    after: dict[int, tuple[int, int, str]],
    ours: set[int],
    elapsed: float,
) -> tuple[float, list[str]]:
    """CPU used by processes outside our process groups, in % of one core.

    Processes that started and exited within the window are missed, so this is
    a lower bound: a signal that something else competed for the two cores.
    """
    per: Counter[str] = Counter()
    for pid, (pgid, t1, comm) in after.items():
        if pgid in ours:
            continue
        t0 = before[pid][1] if pid in before and before[pid][2] == comm else 0
        if t1 > t0:
            per[f"{comm}[{pid}]"] += t1 - t0
    total = sum(per.values())
    pct = 100.0 * total / CLK_TCK / elapsed if elapsed > 0 else 0.0
    top = [f"{name} {100.0 * j / CLK_TCK / elapsed:.0f}%" for name, j in per.most_common(3)]
    return pct, top


def cpu_busy_pct(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    res = []
    for (b0, t0), (b1, t1) in zip(before, after, strict=False):
        res.append(100.0 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
    return res


def run_wrk(
    url: str,
    conns: int,
    duration: int,
    body: str,
    auth: str | None,
    latency: bool = False,
) -> WrkResult:
    argv = [*pin(AUX_CORE), "wrk", "-t1", f"-c{conns}", f"-d{duration}s"]
    argv += ["--timeout", "10s", "-s", str(BENCH / "post.lua")]
    if latency:
        argv.append("--latency")
    argv.append(url)
    env = dict(os.environ, BENCH_BODY=body, BENCH_AUTH=auth or "")
    cpu0 = cpu_times()
    snap0, t0 = proc_cpu_snapshot(), time.monotonic()
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish in time: {shlex.join(argv)}") from e
    cpu = cpu_busy_pct(cpu0, cpu_times())
    fpct, ftop = foreign_cpu(snap0, proc_cpu_snapshot(), our_pgids(), time.monotonic() - t0)
    out = cp.stdout
    if cp.returncode != 0 or "Requests/sec" not in out:
        raise BenchError(f"wrk failed (rc {cp.returncode}): {shlex.join(argv)}\n{out}\n{cp.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    sock: dict[str, int] = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        sock = dict(zip(["connect", "read", "write", "timeout"], map(int, m.groups()), strict=True))
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+", out)
    lat_avg = _to_ms(m.group(1)) if m else float("nan")
    lat_max = _to_ms(m.group(3)) if m else float("nan")
    pct = wrk_percentiles(out)
    res = WrkResult(
        conns=conns,
        duration_s=duration,
        requests=reqs,
        rps=rps,
        non2xx=non2xx,
        socket_errors=sock,
        lat_avg_ms=lat_avg,
        lat_max_ms=lat_max,
        percentiles_ms=pct,
        argv=shlex.join(argv),
        raw=out,
        foreign_cpu_pct=fpct,
        foreign_top=ftop,
        cpu_pct=cpu,
    )
    return res


# --------------------------------------------------------------------------
# TTFT client
# --------------------------------------------------------------------------


@dataclass
class TtftResult:
    n: int
    errors: int
    ttft_ms: list[float]
    total_ms: list[float]
    content_ok: bool
    problems: list[str] = field(default_factory=list)
    foreign_cpu_pct: float = 0.0
    foreign_top: list[str] = field(default_factory=list)

    def pct(self, values: list[float], p: int) -> float:
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


async def _ttft_async(url: str, auth: str | None, n: int, warmup: int) -> TtftResult:
    import aiohttp

    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    body = STREAM_REQUEST_BODY.encode()
    ttfts: list[float] = []
    totals: list[float] = []
    errors = 0
    problems: list[str] = []
    content_ok = True
    connector = aiohttp.TCPConnector(limit=1, enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            first: float | None = None
            text_parts: list[str] = []
            done = False
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        errors += 1
                        if len(problems) < 3:
                            snippet = (await resp.read())[:300].decode("utf-8", "replace")
                            problems.append(f"HTTP {resp.status}: {snippet}")
                        else:
                            await resp.read()
                        continue
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        if first is None:
                            first = time.perf_counter() - t0
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                        elif i == 0 or i == warmup:  # check content on a couple of requests
                            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                                ch = json.loads(payload)["choices"]
                                if ch:
                                    text_parts.append(ch[0].get("delta", {}).get("content") or "")
            except (TimeoutError, aiohttp.ClientError) as e:
                errors += 1
                if len(problems) < 3:
                    problems.append(f"{type(e).__name__}: {e}")
                continue
            total = time.perf_counter() - t0
            if first is None or not done:
                errors += 1
                if len(problems) < 3:
                    problems.append("stream ended without data lines or without [DONE]")
                continue
            if (i == 0 or i == warmup) and "".join(text_parts) != REPLY_TEXT:
                content_ok = False
                if len(problems) < 3:
                    problems.append(f"streamed content mismatch: {''.join(text_parts)!r}")
            if i >= warmup:
                ttfts.append(first * 1000.0)
                totals.append(total * 1000.0)
    return TtftResult(n, errors, ttfts, totals, content_ok, problems)


def run_ttft(url: str, auth: str | None, n: int, warmup: int) -> TtftResult:
    try:
        import uvloop  # type: ignore[import-not-found]

        runner = uvloop.run  # the same event loop as the gateways, for a lean client
    except ImportError:
        runner = asyncio.run
    snap0, t0 = proc_cpu_snapshot(), time.monotonic()
    res: TtftResult = runner(_ttft_async(url, auth, n, warmup))
    res.foreign_cpu_pct, res.foreign_top = foreign_cpu(
        snap0, proc_cpu_snapshot(), our_pgids(), time.monotonic() - t0
    )
    return res


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    chat_url: str
    stream_url: str
    auth: str | None
    proc: Proc | None = None
    ready_s: float | None = None


@dataclass
class TargetResult:
    name: str
    c1: WrkResult | None = None
    c32: WrkResult | None = None
    c64: WrkResult | None = None
    ttft: TtftResult | None = None
    cpu_c32: list[float] = field(default_factory=list)
    ready_s: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx for r in (self.c1, self.c32, self.c64) if r)

    @property
    def socket_errors(self) -> int:
        return sum(sum(r.socket_errors.values()) for r in (self.c1, self.c32, self.c64) if r)


def sanity_check(t: Target) -> list[str]:
    """One plain and one streaming request; raise on non-200, return notes."""
    notes = []
    headers = {"Content-Type": "application/json"}
    if t.auth:
        headers["Authorization"] = f"Bearer {t.auth}"
    status, hdrs, data = http("POST", t.chat_url, REQUEST_BODY, headers, timeout=30)
    if status != 200:
        raise BenchError(
            f"{t.name}: POST {t.chat_url} -> HTTP {status}: {data[:500]!r}"
            + (f"\n--- last lines of {t.proc.log_path} ---\n{t.proc.log_tail()}" if t.proc else "")
        )
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(
            f"{t.name}: non-streaming response is not a chat completion: {data[:500]!r}"
        ) from None
    if content != REPLY_TEXT:
        notes.append(f"non-streaming content differs from the mock's: {content!r}")
    status, hdrs, data = http("POST", t.stream_url, STREAM_REQUEST_BODY, headers, timeout=30)
    if status != 200:
        raise BenchError(
            f"{t.name}: streaming POST {t.stream_url} -> HTTP {status}: {data[:500]!r}"
        )
    ctype = hdrs.get("content-type", "")
    if not ctype.startswith("text/event-stream"):
        notes.append(f"streaming content-type is {ctype!r}")
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.startswith("data:")]
    if not lines or lines[-1].strip() != "data: [DONE]":
        raise BenchError(f"{t.name}: stream does not end with data: [DONE]: {data[-300:]!r}")
    return notes


class NoiseBudget:
    """Seconds the whole script may spend waiting for quiet or repeating disturbed runs."""

    left = 0.0


def wait_quiet(max_wait: float, label: str) -> None:
    """Before a measured run: wait (bounded) until other processes leave the CPUs alone."""
    start = time.monotonic()
    deadline = start + min(max_wait, max(NoiseBudget.left, 0.0))
    said = False
    while True:
        snap0, t0 = proc_cpu_snapshot(), time.monotonic()
        time.sleep(1.0)
        pct, top = foreign_cpu(snap0, proc_cpu_snapshot(), our_pgids(), time.monotonic() - t0)
        NoiseBudget.left -= time.monotonic() - t0
        if pct < QUIET_PCT:
            return
        if time.monotonic() >= deadline:
            log(f"{label}: still busy ({pct:.0f}% of a core: {', '.join(top)}); going ahead")
            return
        if not said:
            log(f"{label}: waiting for other processes to calm down ({', '.join(top)})")
            said = True


def trials(label: str, args: argparse.Namespace, fn: Any) -> tuple[Any, list[Any]]:
    """Run fn up to --repeat times; keep the trial least disturbed by other processes.

    A trial during which processes outside the benchmark used less than
    FOREIGN_CPU_WARN_PCT of a core is clean and ends the series.
    """
    done: list[Any] = []
    trial_s = 0.0
    for i in range(args.repeat):
        if i > 0:
            NoiseBudget.left -= trial_s
        wait_quiet(args.quiet_wait, label)
        t0 = time.monotonic()
        r = fn()
        trial_s = time.monotonic() - t0
        done.append(r)
        if r.foreign_cpu_pct < FOREIGN_CPU_WARN_PCT:
            break
        if i + 1 < args.repeat and NoiseBudget.left >= trial_s:
            log(f"{label}: noisy trial ({r.foreign_cpu_pct:.0f}% foreign CPU); repeating")
        else:
            break
    best = min(done, key=lambda r: r.foreign_cpu_pct)
    return best, done


def measure(t: Target, args: argparse.Namespace) -> TargetResult:
    res = TargetResult(t.name, ready_s=t.ready_s)
    res.notes += sanity_check(t)
    log(f"{t.name}: warm-up {args.warmup}s at c=8")
    run_wrk(t.chat_url, 8, args.warmup, REQUEST_BODY, t.auth)
    run_ttft(t.stream_url, t.auth, n=0, warmup=20)

    all_wrk: list[WrkResult] = []
    for conns in (1, 32, 64):
        label = f"{t.name} c={conns}"
        log(f"{label}: {args.duration}s of wrk")
        best, done = trials(
            label,
            args,
            lambda c=conns: run_wrk(t.chat_url, c, args.duration, REQUEST_BODY, t.auth, True),
        )
        setattr(res, f"c{conns}", best)
        all_wrk += [r for r in done if r is not best]
        if len(done) > 1:
            res.notes.append(
                f"wrk c={conns}: {len(done)} trials (foreign CPU "
                + ", ".join(f"{r.foreign_cpu_pct:.0f}%" for r in done)
                + f"), kept the one at {best.foreign_cpu_pct:.0f}%: "
                + ", ".join(f"{r.rps:,.0f}" for r in done)
                + " req/s"
            )
    assert res.c32 is not None
    res.cpu_c32 = res.c32.cpu_pct
    label = f"{t.name} TTFT"
    log(f"{label}: {args.ttft_requests} sequential streaming requests")
    res.ttft, ttft_done = trials(
        label, args, lambda: run_ttft(t.stream_url, t.auth, n=args.ttft_requests, warmup=10)
    )
    if len(ttft_done) > 1:
        res.notes.append(
            f"TTFT: {len(ttft_done)} trials (foreign CPU "
            + ", ".join(f"{r.foreign_cpu_pct:.0f}%" for r in ttft_done)
            + "), p50 "
            + ", ".join(f"{r.pct(r.ttft_ms, 50):.3f}" for r in ttft_done)
            + " ms"
        )
    if res.ttft.problems:
        res.notes += [f"TTFT: {p}" for p in res.ttft.problems]
    for r in ttft_done:
        if r is not res.ttft and r.errors:
            res.notes.append(f"TTFT (discarded trial): {r.errors} failures")
    for r in [res.c1, res.c32, res.c64, *all_wrk]:
        assert r is not None
        if r.errors:
            kept = "" if any(r is x for x in (res.c1, res.c32, res.c64)) else " (discarded trial)"
            res.notes.append(
                f"wrk c={r.conns}{kept}: {r.non2xx} non-2xx, socket errors {r.socket_errors}"
            )
    for label, r in [
        *((f"wrk c={r.conns}", r) for r in (res.c1, res.c32, res.c64)),
        ("TTFT", res.ttft),
    ]:
        if r.foreign_cpu_pct >= FOREIGN_CPU_WARN_PCT:
            msg = (
                f"{label}: other processes used {r.foreign_cpu_pct:.0f}% of a core "
                f"({', '.join(r.foreign_top)})"
            )
            res.notes.append("NOISY: " + msg)
            log("warning: " + msg)
    assert res.c1 is not None
    assert res.c64 is not None
    log(
        f"{t.name}: p50 {res.c1.percentiles_ms.get('50', float('nan')):.3f} ms, "
        f"p99 {res.c1.percentiles_ms.get('99', float('nan')):.3f} ms, "
        f"c32 {res.c32.rps:,.0f} req/s, c64 {res.c64.rps:,.0f} req/s, "
        f"TTFT p50 {res.ttft.pct(res.ttft.ttft_ms, 50):.3f} ms, "
        f"errors {res.non2xx} non-2xx / {res.socket_errors} socket / {res.ttft.errors} ttft"
    )
    return res


# --------------------------------------------------------------------------
# Starting the three servers
# --------------------------------------------------------------------------


def start_nginx(pm: ProcessManager, tmp: Path, commands: dict[str, str]) -> Proc:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise BenchError("nginx not found (Debian package 'nginx' / /usr/sbin/nginx)")
    ndir = tmp / "nginx"
    ndir.mkdir()
    ndir.chmod(0o755)
    conf = (BENCH / "nginx.conf").read_text()
    conf = (
        conf.replace("@@WORKDIR@@", str(ndir))
        .replace("@@PORT@@", str(NGINX_PORT))
        .replace("@@CHAT_BODY@@", nginx_quote(chat_completion_body()))
        .replace("@@SSE_BODY@@", nginx_quote(sse_body()))
    )
    (ndir / "nginx.conf").write_text(conf)
    (OUT / "nginx.rendered.conf").write_text(conf)  # for inspection
    argv = [*pin(AUX_CORE), nginx, "-p", str(ndir), "-c", str(ndir / "nginx.conf")]
    proc = pm.start("nginx", argv, OUT / "nginx.log")
    commands["nginx"] = (
        shlex.join([*pin(AUX_CORE), nginx])
        + " -p $TMP -c $TMP/nginx.conf   # $TMP/nginx.conf rendered from bench/nginx.conf"
    )
    wait_ready(proc, f"http://{HOST}:{NGINX_PORT}/healthz", timeout=15)
    return proc


def venv_bin(name: str) -> str | None:
    """Find an executable next to the running interpreter, in the repo venv, or on PATH."""
    for cand in (Path(sys.executable).parent / name, REPO / ".venv" / "bin" / name):
        if cand.exists():
            return str(cand)
    return shutil.which(name)


def config_for_ports(rel: str) -> str:
    """The config file to use: the committed one, or a copy with the mock's port changed."""
    if NGINX_PORT == DEFAULT_NGINX_PORT:
        return rel
    src = REPO / rel
    dst = OUT / f"{src.stem}.port{NGINX_PORT}{src.suffix}"
    dst.write_text(src.read_text().replace(f"{HOST}:{DEFAULT_NGINX_PORT}", f"{HOST}:{NGINX_PORT}"))
    return str(dst.relative_to(REPO))


def start_sluice(pm: ProcessManager, commands: dict[str, str], timeout: float) -> Proc:
    exe = venv_bin("sluice")
    if not exe:
        raise BenchError("`sluice` executable not found; activate the repo's .venv")
    cp = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise BenchError(
            f"`sluice serve --help` failed (rc {cp.returncode}):\n{cp.stdout}{cp.stderr}"
        )
    args = ["serve", "--config", config_for_ports("bench/sluice-bench.yaml"), "--host", HOST]
    args += ["--port", str(SLUICE_PORT), "--workers", "1"]
    argv = [*pin(GATEWAY_CORE), exe, *args]
    env = dict(os.environ, BENCH_UPSTREAM_KEY=UPSTREAM_KEY)
    proc = pm.start("sluice", argv, OUT / "sluice.log", env=env)
    commands["sluice"] = (
        f"BENCH_UPSTREAM_KEY={UPSTREAM_KEY} {shlex.join(pin(GATEWAY_CORE))} sluice "
        + shlex.join(args)
        + " > bench/.work/gateway/sluice.log 2>&1"
    )
    return proc


def ensure_litellm_venv() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"creating {LITELLM_VENV} with litellm[proxy]=={LITELLM_VERSION} (one-off, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    install_log = WORK / "litellm-install.log"
    with open(install_log, "wb") as lf:
        cp = subprocess.run(
            [*pip, f"litellm[proxy]=={LITELLM_VERSION}"],
            stdout=lf,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
    if cp.returncode != 0:
        # litellm 1.109.1 pins certifi>=2026.10.19 and litellm-proxy-extras==0.4.113,
        # which the package mirror here does not have. Install its declared
        # dependencies with those two pins relaxed, then litellm itself --no-deps.
        log(
            "plain install failed (unsatisfiable pins on this mirror); relaxing certifi and "
            "litellm-proxy-extras pins"
        )
        reqs = _litellm_requirements()
        req_file = WORK / "litellm-reqs.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        with open(install_log, "ab") as lf:
            subprocess.run(
                [*pip, "-r", str(req_file)],
                stdout=lf,
                stderr=subprocess.STDOUT,
                timeout=1800,
                check=True,
            )
            subprocess.run(
                [*pip, "--no-deps", f"litellm=={LITELLM_VERSION}"],
                stdout=lf,
                stderr=subprocess.STDOUT,
                timeout=1800,
                check=True,
            )
    if not exe.exists():
        raise BenchError(f"litellm install failed; see {install_log}")
    return exe


def _litellm_requirements() -> list[str]:
    import zipfile
    from email.parser import Parser

    dl = WORK / "litellm-dl"
    subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            f"litellm=={LITELLM_VERSION}",
            "-d",
            str(dl),
        ],
        check=True,
        timeout=600,
    )
    whl = next(dl.glob(f"litellm-{LITELLM_VERSION}-*.whl"))
    with zipfile.ZipFile(whl) as z:
        meta = z.read(f"litellm-{LITELLM_VERSION}.dist-info/METADATA").decode()
    relax = {"certifi", "litellm-proxy-extras"}
    out = []
    for r in Parser().parsestr(meta).get_all("Requires-Dist") or []:
        req, _, marker = (x.strip() for x in r.partition(";"))
        if "extra ==" in marker and "extra == 'proxy'" not in marker:
            continue
        marker = re.sub(r"\s*and extra == 'proxy'|extra == 'proxy'\s*(and)?", "", marker).strip()
        name = re.split(r"[<>=!~\[ ]", req)[0].lower()
        if name in relax:
            req = name
        out.append(req + (f"; {marker}" if marker else ""))
    return out


def start_litellm(pm: ProcessManager, commands: dict[str, str]) -> Proc:
    exe = ensure_litellm_venv()
    args = ["--config", config_for_ports("bench/litellm-config.yaml"), "--host", HOST]
    args += ["--port", str(LITELLM_PORT), "--num_workers", "1"]
    argv = [*pin(GATEWAY_CORE), str(exe), *args]
    extra_env = {
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
        # No network here: use the bundled model cost map instead of fetching it.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    env = dict(os.environ, **extra_env)
    env.pop("DATABASE_URL", None)
    proc = pm.start("litellm", argv, OUT / "litellm.log", env=env)
    commands["litellm"] = (
        " ".join(f"{k}={v}" for k, v in extra_env.items())
        + f" {shlex.join(pin(GATEWAY_CORE))} bench/.work/litellm-venv/bin/litellm "
        + shlex.join(args)
        + " > bench/.work/gateway/litellm.log 2>&1"
    )
    return proc


# --------------------------------------------------------------------------
# Facts and versions
# --------------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"
    return (cp.stdout + cp.stderr).strip()


def _pkg_version(python: str, *names: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    try:
        cp = subprocess.run(
            [python, "-c", code, *names], capture_output=True, text=True, timeout=60
        )
        return json.loads(cp.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {n: "n/a" for n in names}


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
    return {
        "nproc": _cmd(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_release(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def _git_state() -> str:
    """' (commit abc1234)' plus a note when src/ has uncommitted changes (read-only git)."""
    head = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if not re.fullmatch(r"[0-9a-f]{4,40}", head):
        return ""
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return f" (commit {head}{', with uncommitted changes in src/' if dirty else ''})"


def versions(with_litellm: bool) -> dict[str, str]:
    py = venv_bin("python") or sys.executable
    v = {"python": _cmd([py, "-c", "import sys; print(sys.version.split()[0])"])}
    pk = _pkg_version(py, "sluice-gateway", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson")
    v["sluice"] = pk.pop("sluice-gateway") + _git_state()
    v.update(pk)
    v["nginx"] = _cmd(["nginx", "-v"]).replace("nginx version: ", "")
    v["wrk"] = _cmd(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].replace("wrk ", "")
    if with_litellm and (LITELLM_VENV / "bin" / "python").exists():
        lv = _pkg_version(str(LITELLM_VENV / "bin" / "python"), "litellm", "uvicorn", "uvloop")
        v["litellm"] = lv["litellm"]
        v["litellm's uvicorn/uvloop"] = f"{lv['uvicorn']} / {lv['uvloop']}"
    return v


# --------------------------------------------------------------------------
# Sluice extras: access log + metrics, profiling
# --------------------------------------------------------------------------


def check_sluice_observability(proc: Proc) -> list[str]:
    notes = []
    try:
        status, _hdrs, data = http("GET", f"http://{HOST}:{SLUICE_PORT}/metrics", timeout=10)
        if status == 200:
            n = sum(1 for ln in data.decode("utf-8", "replace").splitlines() if ln and ln[0] != "#")
            notes.append(f"GET /metrics: 200, {n} samples")
        else:
            notes.append(f"GET /metrics: HTTP {status} (metrics not on?)")
    except OSError as e:
        notes.append(f"GET /metrics failed: {e}")
    try:
        lines = proc.log_path.read_bytes().splitlines()
    except OSError:
        lines = []
    json_lines = 0
    statuses: Counter[str] = Counter()
    for ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError:
            continue
        if isinstance(obj, dict):
            json_lines += 1
            if obj.get("logger") == "sluice.access":
                statuses[str(obj.get("status"))] += 1
    by_status = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())) or "none"
    notes.append(
        f"log file {proc.log_path.relative_to(REPO)}: {len(lines):,} lines, "
        f"{json_lines:,} JSON objects, access-log lines by status: {by_status}"
    )
    return notes


def check_litellm_log(proc: Proc) -> list[str]:
    """Count uvicorn access-log lines by status (LiteLLM logs them by default)."""
    try:
        text = proc.log_path.read_bytes().decode("utf-8", "replace")
    except OSError as e:
        return [f"cannot read {proc.log_path}: {e}"]
    statuses = Counter(re.findall(r'"POST /v1/chat/completions HTTP/1\.1" (\d+)', text))
    errors = len(re.findall(r"(?m)^.*(?:Traceback|ERROR|Exception).*$", text))
    by_status = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())) or "none"
    return [
        f"log file {proc.log_path.relative_to(REPO)}: chat completions by status: {by_status}; "
        f"{errors} lines mentioning errors"
    ]


def find_py_spy() -> str:
    for cand in (shutil.which("py-spy"), TOOLS_VENV / "bin" / "py-spy"):
        if cand and Path(cand).exists():
            return str(cand)
    log(f"installing py-spy into {TOOLS_VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
    subprocess.run(
        [str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "py-spy"], check=True, timeout=600
    )
    return str(TOOLS_VENV / "bin" / "py-spy")


def _frame_package(frame: str) -> str:
    """'func (uvicorn/protocols/http/x.py:12)' -> 'uvicorn'."""
    m = re.search(r"\(([^()]*):\d+\)$", frame)
    path = m.group(1) if m else frame
    if path.startswith("<"):
        return path
    return path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")


def profile_sluice(t: Target, duration: int) -> dict[str, Any]:
    """py-spy under c=32 load (after the measured runs, so it does not skew them)."""
    assert t.proc is not None
    py_spy = find_py_spy()
    pid = t.proc.popen.pid
    raw = OUT / "sluice-profile.folded"
    svg = OUT / "sluice-profile.svg"
    out: dict[str, Any] = {}
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        argv = [
            "taskset",
            "-c",
            AUX_CORE,
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--function",
            "--gil",
            "--rate",
            "500",
            "--duration",
            str(duration),
            "--format",
            fmt,
            "-o",
            str(path),
        ]
        spy = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        OUR_PGIDS.add(spy.pid)
        try:
            time.sleep(0.5)
            wrk = run_wrk(t.chat_url, 32, duration, REQUEST_BODY, t.auth)
            try:
                spy_out = spy.communicate(timeout=duration + 30)[0].decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                spy_out = "(py-spy timed out)"
        finally:
            if spy.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(spy.pid, signal.SIGKILL)
                spy.wait()
        out[f"rps_{fmt}"] = wrk.rps
        if spy.returncode != 0:
            out["error"] = f"py-spy failed (rc {spy.returncode}): {spy_out[-2000:]}"
            return out
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg_own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        n = int(cnt)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        own[frames[-1]] += n
        pkg_own[_frame_package(frames[-1])] += n
        for f in set(frames):
            incl[f] += n
    out["samples"] = total
    out["own"] = [(f, c, 100.0 * c / total) for f, c in own.most_common(15)] if total else []
    out["inclusive"] = (
        [(f, c, 100.0 * c / total) for f, c in incl.most_common() if "(sluice/" in f][:25]
        if total
        else []
    )
    out["packages"] = (
        [(f, c, 100.0 * c / total) for f, c in pkg_own.most_common(12)] if total else []
    )
    out["svg"] = str(svg.relative_to(REPO))
    out["folded"] = str(raw.relative_to(REPO))
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:.3f}"


def fmt_delta(v: float | None) -> str:
    if v is None or v != v:
        return "—"
    return f"{v:+.3f}"


def build_tables(results: dict[str, TargetResult]) -> tuple[str, str, dict[str, Any]]:
    names = ["direct", "sluice", "litellm"]
    cols = {
        "direct": "direct (nginx)",
        "sluice": "Sluice",
        "litellm": "LiteLLM",
    }

    def val(name: str, key: str) -> float | None:
        r = results.get(name)
        if r is None or r.skipped:
            return None
        if key == "p50":
            return r.c1.percentiles_ms.get("50") if r.c1 else None
        if key == "p99":
            return r.c1.percentiles_ms.get("99") if r.c1 else None
        if key == "rps32":
            return r.c32.rps if r.c32 else None
        if key == "rps64":
            return r.c64.rps if r.c64 else None
        if key == "p50_c32":
            return r.c32.percentiles_ms.get("50") if r.c32 else None
        if key == "p99_c32":
            return r.c32.percentiles_ms.get("99") if r.c32 else None
        if key == "ttft50":
            return r.ttft.pct(r.ttft.ttft_ms, 50) if r.ttft else None
        if key == "ttft99":
            return r.ttft.pct(r.ttft.ttft_ms, 99) if r.ttft else None
        raise KeyError(key)

    rows = [
        ("p50 latency, c=1 (ms)", "p50", "ms"),
        ("p99 latency, c=1 (ms)", "p99", "ms"),
        ("req/s, c=32", "rps32", "rps"),
        ("req/s, c=64", "rps64", "rps"),
        ("p50 / p99 latency, c=32 (ms)", ("p50_c32", "p99_c32"), "pair"),
        ("streaming TTFT p50 (ms)", "ttft50", "ms"),
        ("streaming TTFT p99 (ms)", "ttft99", "ms"),
    ]
    header = "| Metric | " + " | ".join(cols[n] for n in names)
    header += " | Sluice - direct | LiteLLM - direct |"
    lines = [header, "|---|" + "---:|" * (len(names) + 2)]
    for label, key, kind in rows:
        cells = []
        for n in names:
            r = results.get(n)
            if r is None or r.skipped:
                cells.append("not run")
                continue
            if kind == "pair":
                cells.append(f"{fmt_ms(val(n, key[0]))} / {fmt_ms(val(n, key[1]))}")
            elif kind == "rps":
                v = val(n, key)
                cells.append(f"{v:,.0f}" if v is not None else "—")
            else:
                cells.append(fmt_ms(val(n, key)))
        d = val("direct", key) if kind != "pair" else None
        for n in ("sluice", "litellm"):
            v = val(n, key) if kind != "pair" else None
            if kind == "ms" and d is not None and v is not None:
                cells.append(fmt_delta(v - d))
            elif kind == "rps" and d and v is not None:
                cells.append(f"{100.0 * v / d:.1f}% of direct")
            else:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    err_cells = []
    for n in names:
        r = results.get(n)
        if r is None or r.skipped:
            err_cells.append("not run")
        else:
            te = r.ttft.errors if r.ttft else 0
            err_cells.append(f"{r.non2xx} / {r.socket_errors} / {te}")
    lines.append(
        "| errors: wrk non-2xx / wrk socket errors / TTFT failures | "
        + " | ".join(err_cells)
        + " | | |"
    )
    cpu_cells = []
    for n in names:
        r = results.get(n)
        if r is None or r.skipped or not r.cpu_c32:
            cpu_cells.append("not run" if r is None or r.skipped else "—")
        else:
            cpu_cells.append(" / ".join(f"{c:.0f}%" for c in r.cpu_c32[:2]))
    lines.append("| CPU busy during c=32, core 0 / core 1 | " + " | ".join(cpu_cells) + " | | |")
    main_table = "\n".join(lines)

    # Targets
    s_p50, d_p50 = val("sluice", "p50"), val("direct", "p50")
    s_rps = val("sluice", "rps32")
    summary: dict[str, Any] = {}
    trows = ["| Target | Goal | Measured | Status |", "|---|---|---|---|"]
    if s_p50 is not None and d_p50 is not None:
        ov = s_p50 - d_p50
        ok = ov <= TARGET_P50_OVERHEAD_MS
        summary["p50_overhead_ms"] = ov
        summary["p50_overhead_met"] = ok
        trows.append(
            f"| Sluice p50 overhead vs direct, c=1 | ≤ {TARGET_P50_OVERHEAD_MS} ms | "
            f"{ov:.3f} ms ({s_p50:.3f} - {d_p50:.3f}) | {'met' if ok else 'missed'} |"
        )
    else:
        trows.append(
            f"| Sluice p50 overhead vs direct, c=1 | ≤ {TARGET_P50_OVERHEAD_MS} ms | "
            "not measured | not measured |"
        )
    if s_rps is not None:
        ok = s_rps >= TARGET_RPS_C32
        summary["rps_c32"] = s_rps
        summary["rps_c32_met"] = ok
        trows.append(
            f"| Sluice throughput, c=32, one core | ≥ {TARGET_RPS_C32:,.0f} req/s | "
            f"{s_rps:,.0f} req/s | {'met' if ok else 'missed'} |"
        )
    else:
        trows.append(
            f"| Sluice throughput, c=32, one core | ≥ {TARGET_RPS_C32:,.0f} req/s | "
            "not measured | not measured |"
        )
    return main_table, "\n".join(trows), summary


def noise_warning(results: dict[str, TargetResult]) -> list[str]:
    """A warning paragraph when measured runs were disturbed by other processes."""
    runs = noisy = 0
    worst = 0.0
    for r in results.values():
        for m in (r.c1, r.c32, r.c64, r.ttft):
            if m is None:
                continue
            runs += 1
            worst = max(worst, m.foreign_cpu_pct)
            if m.foreign_cpu_pct >= FOREIGN_CPU_WARN_PCT:
                noisy += 1
    if not noisy:
        return [f"All {runs} measured runs were undisturbed by other processes.", ""]
    return [
        f"**Caution: {noisy} of {runs} measured runs were disturbed by other processes on "
        f"this shared machine (up to {worst:.0f}% of a core; see the notes). Treat the "
        "figures as approximate: disturbance makes any target look slower, so throughput "
        "is a lower bound and overheads (target - direct) can be off either way.**",
        "",
    ]


def render_section(
    results: dict[str, TargetResult],
    facts: dict[str, str],
    vers: dict[str, str],
    commands: dict[str, str],
    wrk_cmds: dict[str, str],
    args: argparse.Namespace,
    runtime_s: float,
    profile: dict[str, Any] | None,
) -> str:
    main_table, targets_table, _ = build_tables(results)
    today = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [
        "## Core gateway",
        "",
        "Overhead of the gateway itself: an OpenAI-compatible mock upstream (nginx returning "
        "a fixed body) measured directly, through Sluice and through the LiteLLM proxy. "
        "Generated by `bench/gateway_bench.py` "
        f"(last run {today}, `--duration {args.duration}`, total script runtime "
        f"{runtime_s:.0f} s). Lower latency / higher req/s is better; overhead = target - "
        "direct.",
        "",
        "### Machine",
        "",
        f"- `nproc`: {facts['nproc']}; CPU: {facts['cpu']}; memory {facts['memory']}",
        f"- OS: {facts['os']}, kernel {facts['kernel']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "### Setup",
        "",
        "- Mock upstream: nginx, 1 worker, `access_log off`, `keepalive_requests` unlimited, "
        f"on 127.0.0.1:{NGINX_PORT}. `POST /v1/chat/completions` returns a fixed "
        f"`chat.completion` JSON ({len(chat_completion_body())} bytes); "
        "`POST /stream/v1/chat/completions` returns a fixed `text/event-stream` body "
        f"({len(sse_body())} bytes: 11 `chat.completion.chunk` events, then `data: [DONE]`), "
        "sent in one go. Both gateways have two models, `gpt-4o-mini` (JSON) and "
        "`gpt-4o-mini-stream` (SSE), because nginx cannot branch on the request's `stream` flag.",
        f"- CPU pinning: the gateway under test is pinned to core {GATEWAY_CORE} "
        f"(`taskset -c {GATEWAY_CORE}`, 1 worker process; nothing of the benchmark's own runs "
        "there, but other work on the machine is not kept off it). nginx, wrk (1 thread) and the "
        f"benchmark script with its TTFT client share core {AUX_CORE} (`taskset -c {AUX_CORE}`). "
        "In the direct runs, core 1 is the bottleneck (wrk and nginx on one core); through a "
        "gateway, core 0 is (see the CPU row).",
        "- Sluice: config `bench/sluice-bench.yaml`, JSON access log on (stdout, to "
        "`bench/.work/gateway/sluice.log`), metrics on. No auth.",
        "- LiteLLM: `litellm[proxy]` in its own venv `bench/.work/litellm-venv`, config "
        "`bench/litellm-config.yaml` (`openai/gpt-4o-mini` with `api_base` pointing at the mock), "
        f"master key `{MASTER_KEY}` sent as `Authorization: Bearer`, no database, default logging "
        "(uvicorn access log on). litellm 1.109.1 pins `certifi>=2026.10.19` and "
        "`litellm-proxy-extras==0.4.113`, which the package mirror here lacks, so the script "
        "installs its declared dependencies with those two pins relaxed, then litellm `--no-deps`.",
        f"- Each target: one plain and one streaming sanity request (must be 200 and well-formed), "
        f"warm-up ({args.warmup} s of wrk at c=8 and 20 streaming requests), then "
        f"wrk at c=1 (`--latency`), c=32 and c=64 for {args.duration} s each, then "
        f"{args.ttft_requests} sequential streaming requests (after 10 unmeasured) with an "
        "aiohttp client measuring send → first `data:` line (TTFT).",
        "- Shared-machine guard: the script accounts the CPU time of every process outside "
        "its own process groups during each measured run. Before each run it waits (up to "
        f"{args.quiet_wait:.0f} s) for them to go quiet; a run during which they used "
        f"≥ {FOREIGN_CPU_WARN_PCT:.0f}% of a core is repeated (up to {args.repeat} trials) and "
        f"the least disturbed trial is kept (at most {args.noise_budget:.0f} s of waiting and "
        "repeating in all); anything still disturbed is listed as NOISY in the notes."
        + (
            f" All benchmark processes ran at `nice -n {args.nice}` to limit interference."
            if args.nice
            else ""
        ),
        "",
        "### Commands",
        "",
        "```sh",
        f"python bench/gateway_bench.py --duration {args.duration}"
        + (" --skip-sluice" if args.skip_sluice else "")
        + (" --skip-litellm" if args.skip_litellm else "")
        + (" --profile" if args.profile else "")
        + (f" --nice {args.nice}" if args.nice else "")
        + (f" --noise-budget {args.noise_budget:g}" if args.noise_budget != 180.0 else "")
        + " --write-docs",
        "# what it runs:",
        *commands.values(),
        *wrk_cmds.values(),
        '# TTFT: in-process aiohttp client (core 1), POST with "stream": true to',
        f"#   direct  http://{HOST}:{NGINX_PORT}/stream/v1/chat/completions",
        f"#   gateway http://{HOST}:{{{SLUICE_PORT},{LITELLM_PORT}}}/v1/chat/completions"
        "  model gpt-4o-mini-stream",
        "```",
        "",
        "### Results",
        "",
        *noise_warning(results),
        main_table,
        "",
        "### Targets",
        "",
        targets_table,
        "",
    ]
    notes = [f"- {n}" for n in args.machine_notes]
    for name, r in results.items():
        if r.skipped:
            notes.append(f"- {name}: not run ({r.skipped})")
            continue
        if r.ready_s is not None:
            notes.append(f"- {name}: ready after {r.ready_s:.1f} s")
        for n in r.notes:
            notes.append(f"- {name}: {n}")
    if notes:
        out += ["### Notes", "", *notes, ""]
    if profile and profile.get("own"):
        out += [
            "### Sluice profile (py-spy, c=32)",
            "",
            "`py-spy record --function --gil --rate 500 --subprocesses` on the Sluice process "
            f"during a separate {args.duration} s c=32 run (not a measured one; "
            f"{profile['samples']} samples of the thread holding the GIL, so idle time and "
            f"background threads are excluded; flamegraph at `{profile['svg']}`, not "
            "committed). Top functions by own time:",
            "",
            "| # | Function (file) | own samples | % |",
            "|---:|---|---:|---:|",
        ]
        for i, (f, c, p) in enumerate(profile["own"][:10], 1):
            out.append(f"| {i} | `{f}` | {c} | {p:.1f}% |")
        out += [
            "",
            "py-spy shows only Python frames: time in C code is charged to the Python function "
            "that called it (socket writes to `RequestResponseCycle.send`, uvloop's own loop to "
            "`Runner.run`). Own time by package:",
            "",
            "| Package | own samples | % |",
            "|---|---:|---:|",
        ]
        for f, c, p in profile["packages"]:
            out.append(f"| `{f}` | {c} | {p:.1f}% |")
        out.append("")
    return "\n".join(out)


def write_section(name: str, section: str) -> None:
    """Replace the ``<!-- NAME:start/end -->`` section of docs/benchmarks.md (append if absent).

    Shared by every script in bench/, each owning one section.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if DOCS.exists():
        text = DOCS.read_text()
        if start in text and end in text:
            pre, rest = text.split(start, 1)
            _, post = rest.split(end, 1)
            text = pre + block.rstrip("\n") + post
            if not text.endswith("\n"):
                text += "\n"
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = (
            "# Benchmarks\n\n"
            "Each section below is generated by a script in `bench/` and lives between its own\n"
            "`<!-- NAME:start -->` / `<!-- NAME:end -->` markers; a script rewrites only its own\n"
            "section, so sections can be added (local engine, auth/limits, ...) independently.\n\n"
            + block
        )
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
    log(f"wrote the {name} section of {DOCS}")


def write_docs(section: str) -> None:
    write_section("core-gateway", section)


def result_json(r: TargetResult) -> dict[str, Any]:
    def w(x: WrkResult | None) -> dict[str, Any] | None:
        if x is None:
            return None
        d = dict(x.__dict__)
        d.pop("raw")
        return d

    return {
        "skipped": r.skipped,
        "ready_s": r.ready_s,
        "c1": w(r.c1),
        "c32": w(r.c32),
        "c64": w(r.c64),
        "cpu_c32": r.cpu_c32,
        "ttft": None
        if r.ttft is None
        else {
            "n": r.ttft.n,
            "errors": r.ttft.errors,
            "p50_ms": r.ttft.pct(r.ttft.ttft_ms, 50),
            "p90_ms": r.ttft.pct(r.ttft.ttft_ms, 90),
            "p99_ms": r.ttft.pct(r.ttft.ttft_ms, 99),
            "total_p50_ms": r.ttft.pct(r.ttft.total_ms, 50),
            "content_ok": r.ttft.content_ok,
        },
        "notes": r.notes,
    }


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up load per target")
    p.add_argument(
        "--ttft-requests",
        type=int,
        default=300,
        help="sequential streaming requests for TTFT (default 300)",
    )
    p.add_argument("--skip-sluice", action="store_true")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite the core-gateway section of docs/benchmarks.md",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, py-spy Sluice under an extra c=32 run",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="wait up to this many seconds for the machine to be idle before starting",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value for every benchmark process (e.g. -10 on a shared machine; needs root)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="max trials per measurement when other processes disturb it; the least "
        "disturbed trial is kept (default 3; a clean first trial ends the series)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measured run, wait up to this long for other processes to go "
        "quiet (default 20 s)",
    )
    p.add_argument(
        "--noise-budget",
        type=float,
        default=180.0,
        help="total seconds the script may spend waiting for quiet and repeating disturbed "
        "runs (default 180; 0 disables both)",
    )
    p.add_argument("--nginx-port", type=int, default=NGINX_PORT)
    p.add_argument("--sluice-port", type=int, default=SLUICE_PORT)
    p.add_argument("--litellm-port", type=int, default=LITELLM_PORT)
    p.add_argument("--sluice-ready-timeout", type=float, default=60.0)
    p.add_argument("--litellm-ready-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.machine_notes = []
    if args.duration < 1 or args.warmup < 1:
        p.error("--duration and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global NGINX_PORT, SLUICE_PORT, LITELLM_PORT, NICE
    args = parse_args(argv)
    NGINX_PORT, SLUICE_PORT, LITELLM_PORT = args.nginx_port, args.sluice_port, args.litellm_port
    NICE = args.nice
    NoiseBudget.left = args.noise_budget
    t_start = time.monotonic()
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 usable CPU cores (0 and 1)")
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (Debian packages wrk / util-linux)")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit(
            "aiohttp missing: run with the sluice venv (. .venv/bin/activate)"
        ) from None

    args.facts = machine_facts()  # before pinning ourselves: `nproc` honours affinity
    # This script (TTFT client) runs on the aux core, away from the gateway under test.
    os.sched_setaffinity(0, {int(AUX_CORE)})
    if NICE:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_sigterm)
    signal.signal(signal.SIGHUP, _raise_sigterm)

    ports = {"nginx mock": NGINX_PORT}
    if not args.skip_sluice:
        ports["sluice"] = SLUICE_PORT
    if not args.skip_litellm:
        ports["litellm"] = LITELLM_PORT
    pm = ProcessManager()
    results: dict[str, TargetResult] = {}
    commands: dict[str, str] = {}
    wrk_cmds: dict[str, str] = {}
    profile: dict[str, Any] | None = None
    rc = 0
    try:
        require_ports(ports)
        if not args.skip_litellm:
            ensure_litellm_venv()  # before anything runs, so installing is not timed
        busy = wait_for_idle(args.wait_idle)
        if busy:
            log("warning: " + busy)
            args.machine_notes.append(busy + " (waited up to --wait-idle, then started)")
        with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
            start_nginx(pm, Path(tmp), commands)

            direct = Target(
                "direct",
                f"http://{HOST}:{NGINX_PORT}/v1/chat/completions",
                f"http://{HOST}:{NGINX_PORT}/stream/v1/chat/completions",
                None,
            )
            results["direct"] = measure(direct, args)
            for c in (1, 32, 64):
                r = getattr(results["direct"], f"c{c}")
                wrk_cmds[f"c{c}"] = "BENCH_BODY='<request JSON>' " + r.argv.replace(
                    str(BENCH / "post.lua"), "bench/post.lua"
                ).replace(direct.chat_url, "URL")
            wrk_cmds["urls"] = (
                f"# URL = http://{HOST}:{NGINX_PORT}/v1/chat/completions (direct), "
                f"http://{HOST}:{SLUICE_PORT}/v1/chat/completions (Sluice), "
                f"http://{HOST}:{LITELLM_PORT}/v1/chat/completions "
                f"(LiteLLM, BENCH_AUTH={MASTER_KEY})"
            )

            if args.skip_sluice:
                results["sluice"] = TargetResult("sluice", skipped="--skip-sluice")
            else:
                proc = start_sluice(pm, commands, args.sluice_ready_timeout)
                ready = wait_ready(
                    proc, f"http://{HOST}:{SLUICE_PORT}/readyz", args.sluice_ready_timeout
                )
                t = Target(
                    "sluice",
                    f"http://{HOST}:{SLUICE_PORT}/v1/chat/completions",
                    f"http://{HOST}:{SLUICE_PORT}/v1/chat/completions",
                    None,
                    proc,
                    ready,
                )
                results["sluice"] = measure(t, args)
                results["sluice"].notes += check_sluice_observability(proc)
                if args.profile:
                    try:
                        profile = profile_sluice(t, args.duration)
                        if profile.get("error"):
                            results["sluice"].notes.append(profile["error"])
                    except Exception as e:  # profiling is best effort
                        results["sluice"].notes.append(f"profiling failed: {e}")
                pm.stop(proc)

            if args.skip_litellm:
                results["litellm"] = TargetResult("litellm", skipped="--skip-litellm")
            else:
                proc = start_litellm(pm, commands)
                ready = wait_ready(
                    proc,
                    f"http://{HOST}:{LITELLM_PORT}/health/liveliness",
                    args.litellm_ready_timeout,
                )
                t = Target(
                    "litellm",
                    f"http://{HOST}:{LITELLM_PORT}/v1/chat/completions",
                    f"http://{HOST}:{LITELLM_PORT}/v1/chat/completions",
                    MASTER_KEY,
                    proc,
                    ready,
                )
                results["litellm"] = measure(t, args)
                results["litellm"].notes += check_litellm_log(proc)
                pm.stop(proc)
            pm.stop_all()
    except BenchError as e:
        log(f"FAILED: {e}")
        rc = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    finally:
        pm.stop_all()

    runtime = time.monotonic() - t_start
    if rc != 0:
        return rc

    facts = args.facts
    vers = versions(with_litellm=not args.skip_litellm)
    main_table, targets_table, summary = build_tables(results)
    print()
    print("\n".join(noise_warning(results)))
    print(main_table)
    print()
    print(targets_table)
    print()
    for n in args.machine_notes:
        print(f"- {n}")
    for name, r in results.items():
        for n in r.notes:
            print(f"- {name}: {n}")
    if profile and profile.get("own"):
        print("\nSluice py-spy, top functions by own time (c=32):")
        for f, c, p in profile["own"][:15]:
            print(f"  {p:5.1f}%  {c:6d}  {f}")
        print("\nSluice py-spy, own time by package (c=32):")
        for f, c, p in profile["packages"]:
            print(f"  {p:5.1f}%  {c:6d}  {f}")
        print("\nSluice py-spy, sluice functions by inclusive time (c=32):")
        for f, c, p in profile["inclusive"][:20]:
            print(f"  {p:5.1f}%  {c:6d}  {f}")
    print(f"\ntotal runtime: {runtime:.1f} s")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = OUT / f"results-{stamp}.json"
    out_json.write_text(
        json.dumps(
            {
                "args": vars(args),
                "facts": facts,
                "versions": vers,
                "commands": commands,
                "wrk": wrk_cmds,
                "results": {k: result_json(v) for k, v in results.items()},
                "summary": summary,
                "profile": profile,
                "runtime_s": runtime,
            },
            indent=2,
        )
    )
    log(f"raw results: {out_json.relative_to(REPO)}")
    if args.write_docs:
        write_docs(render_section(results, facts, vers, commands, wrk_cmds, args, runtime, profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
