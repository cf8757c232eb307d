"""Core gateway: the nginx mock measured directly, through Sluice and through LiteLLM.

Each target: a plain and a streaming sanity request, warm-up (wrk c=8 and 20 streams),
then wrk at c=1 (--latency), c=32 and c=64, then sequential streaming requests timed to
their first `data:` line (TTFT). Sluice (bench/sluice-bench.yaml) and LiteLLM
(bench/litellm-config.yaml, in its own venv, created on first use) run alone on core 0;
nginx, wrk and this script share core 1. Setup and figures: docs/benchmarks.md.

    python bench/gateway_bench.py --duration 10 --nice -10 [--skip-litellm]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import harness
import mock_upstream as mock
import uvloop
from harness import GATEWAY, HOST, Bench, BenchError, fmt

UPSTREAM_KEY = "sk-upstream"
LITELLM_KEY = "sk-bench-master"
TARGET_P50_OVERHEAD_MS = 0.5
TARGET_RPS_C32 = 3000.0


def sanity(name: str, chat_url: str, stream_url: str, auth: str | None) -> None:
    """One plain and one streaming request must come back whole and right."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    status, _, data = harness.http("POST", chat_url, mock.REQUEST_BODY, headers, timeout=30)
    if status != 200 or json.loads(data)["choices"][0]["message"]["content"] != mock.REPLY_TEXT:
        raise BenchError(f"{name}: POST {chat_url} -> {status}: {data[:300]!r}")
    status, head, data = harness.http("POST", stream_url, mock.STREAM_REQUEST_BODY, headers, 30)
    if status != 200 or not data.rstrip().endswith(b"data: [DONE]"):
        raise BenchError(f"{name}: streaming POST {stream_url} -> {status}: {data[-300:]!r}")
    if not head.get("content-type", "").startswith("text/event-stream"):
        raise BenchError(f"{name}: streaming content-type {head.get('content-type')!r}")


async def _ttft(url: str, auth: str | None, n: int, warmup: int) -> tuple[list[float], int]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    body, times, errors = mock.STREAM_REQUEST_BODY.encode(), [], 0
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup + n):
            t0, first, done = time.perf_counter(), None, False
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data:"):
                            first = first or time.perf_counter() - t0
                            done = line[5:].strip() == b"[DONE]"
                    ok = resp.status == 200 and first is not None and done
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            errors += not ok
            if ok and i >= warmup and first is not None:
                times.append(first * 1000)
    return times, errors


def ttft(url: str, auth: str | None, n: int, warmup: int = 10) -> dict[str, Any]:
    times, errors = uvloop.run(_ttft(url, auth, n, warmup))
    return {"p50_ms": harness.pct(times, 50), "p99_ms": harness.pct(times, 99), "errors": errors}


def measure(bench: Bench, name: str, base: str, stream_base: str, auth: str | None) -> dict:
    """Sanity, warm-up, wrk c=1, c=32, c=64, then TTFT; `stream_base` answers with SSE."""
    args, chat = bench.args, f"{base}/v1/chat/completions"
    stream_url = f"{stream_base}/v1/chat/completions"
    sanity(name, chat, stream_url, auth)
    bench.wrk(chat, 8, args.warmup, body=mock.REQUEST_BODY, auth=auth)
    ttft(stream_url, auth, 0, warmup=20)
    out: dict[str, Any] = {}
    for conns in (1, 32, 64):

        def run(c: int = conns) -> harness.Wrk:
            return bench.wrk(
                chat, c, args.duration, body=mock.REQUEST_BODY, auth=auth, latency=True
            )

        out[f"c{conns}"], out[f"cpu_c{conns}"] = bench.measure(f"{name} c={conns}", run)
    out["ttft"], _ = bench.measure(
        f"{name} TTFT", lambda: ttft(stream_url, auth, args.ttft_requests)
    )
    harness.log(f"{name}: {out['c1'].latency_ms.get('50')} ms p50, {out['c32'].rps:,.0f} req/s")
    return out


def target(
    bench: Bench, name: str, argv: list[str], env: dict[str, str], port: int, ready: str,
    auth: str | None,
) -> dict[str, Any]:  # fmt: skip
    """A gateway on core 0, measured, stopped."""
    base = f"http://{HOST}:{port}"
    proc = bench.start(name, argv, cores=GATEWAY, env=env, ready=base + ready, timeout=300)
    try:
        return measure(bench, name, base, base, auth)
    finally:
        bench.stop(proc)


def litellm(venv: Path) -> str:
    """LiteLLM's proxy from its own venv (its dependencies clash with Sluice's)."""
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        harness.log(f"installing litellm[proxy] into {venv} (once, a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"]
        if subprocess.run(pip, check=False).returncode != 0 or not exe.exists():
            raise BenchError(f"could not install litellm[proxy] into {venv}; --skip-litellm")
    return str(exe)


RUNS = ("c1", "c32", "c64")


def c32_latency(r: dict[str, Any]) -> str:
    return f"{r['c32'].latency_ms['50']:.3f} / {r['c32'].latency_ms['99']:.3f}"


def errors(r: dict[str, Any]) -> str:
    non2xx, sockets = (sum(getattr(r[c], k) for c in RUNS) for k in ("non2xx", "socket_errors"))
    return f"{non2xx} / {sockets} / {r['ttft']['errors']}"


def busy(r: dict[str, Any]) -> str:
    return " / ".join(f"{x:.0f}%" for x in r["cpu_c32"].cores_pct[:2])


def others(r: dict[str, Any]) -> str:
    return str(max(r[f"cpu_{c}"].others_pct for c in RUNS))


def report(res: dict[str, dict]) -> list[str]:
    names = [n for n in ("direct", "sluice", "litellm") if n in res]

    def lat(c: str, p: str) -> Callable[[str], float]:
        return lambda n: res[n][c].latency_ms[p]

    def text(get: Callable[[dict], str]) -> Callable[[str], str]:
        return lambda n: get(res[n])

    spec: list[tuple[str, Callable[[str], Any], str]] = [  # label, cell, the delta columns
        ("p50 latency, c=1 (ms)", lat("c1", "50"), "ms"),
        ("p99 latency, c=1 (ms)", lat("c1", "99"), "ms"),
        ("req/s, c=32", lambda n: res[n]["c32"].rps, "%"),
        ("req/s, c=64", lambda n: res[n]["c64"].rps, "%"),
        ("p50 / p99 latency, c=32 (ms)", text(c32_latency), ""),
        ("streaming TTFT p50 (ms)", lambda n: res[n]["ttft"]["p50_ms"], "ms"),
        ("streaming TTFT p99 (ms)", lambda n: res[n]["ttft"]["p99_ms"], "ms"),
        ("errors: wrk non-2xx / socket / TTFT", text(errors), ""),
        ("CPU busy during c=32, core 0 / core 1", text(busy), ""),
        ("others' CPU, most in one run (% of a core)", text(others), ""),
    ]
    rows = []
    for label, get, delta in spec:
        v = [get(n) for n in names]
        cells = [x if isinstance(x, str) else fmt(x, 3 if delta == "ms" else 0) for x in v]
        if delta == "ms":
            cells += [f"{x - v[0]:+.3f}" for x in v[1:]]
        else:
            cells += [f"{x / v[0]:.1%} of direct" if delta else "" for x in v[1:]]
        rows.append([label, *cells])
    heads = {"direct": "direct (nginx)", "sluice": "Sluice", "litellm": "LiteLLM"}
    header = ["Metric", *(heads[n] for n in names), *(f"{heads[n]} - direct" for n in names[1:])]
    tables = [harness.table(header, rows)]
    if "sluice" in res:
        p50 = lat("c1", "50")("sluice") - lat("c1", "50")("direct")
        rps = res["sluice"]["c32"].rps
        ok = {True: "met", False: "missed"}
        rows = [
            ["Sluice p50 overhead vs direct, c=1", f"<= {TARGET_P50_OVERHEAD_MS} ms",
             f"{p50:.3f} ms", ok[p50 <= TARGET_P50_OVERHEAD_MS]],
            ["Sluice throughput, c=32, one core", f">= {TARGET_RPS_C32:,.0f} req/s",
             f"{rps:,.0f} req/s", ok[rps >= TARGET_RPS_C32]],
        ]  # fmt: skip
        tables.append(harness.table("Target | Goal | Measured | Status", rows))
    return tables


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--duration", type=int, default=10, help="s per wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="s of wrk c=8 per target")
    parser.add_argument("--ttft-requests", type=int, default=300)
    parser.add_argument("--skip-sluice", action="store_true")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--litellm-venv", default="bench/.work/litellm-venv")
    parser.add_argument("--mock-port", type=int, default=mock.PORT)
    parser.add_argument("--port", type=int, default=8080, help="Sluice's")
    parser.add_argument("--litellm-port", type=int, default=4000)
    args = harness.parse(parser)
    res: dict[str, dict] = {}
    lite: dict[str, str] = {}
    with Bench("gateway", args) as bench:
        exe = None if args.skip_litellm else litellm(harness.REPO / args.litellm_venv)
        mock.start(bench, args.mock_port)
        direct = f"http://{HOST}:{args.mock_port}"
        res["direct"] = measure(bench, "direct", direct, f"{direct}/stream", None)
        env = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
        if not args.skip_sluice:
            config = mock.config(bench, "bench/sluice-bench.yaml", "sluice", args.mock_port)
            argv = [
                harness.venv_bin("sluice"),
                "serve",
                "--config",
                config,
                "--port",
                str(args.port),
            ]
            env_sluice = env | {"PYTHONPATH": str(harness.REPO / "src")}
            res["sluice"] = target(bench, "sluice", argv, env_sluice, args.port, "/readyz", None)
        if exe:
            config = mock.config(bench, "bench/litellm-config.yaml", "litellm", args.mock_port)
            argv = [exe, "--config", config, "--host", HOST, "--port", str(args.litellm_port)]
            # no network here: LiteLLM reads its bundled model cost map
            env |= {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            argv += ["--num_workers", "1"]
            port, ready = args.litellm_port, "/health/liveliness"
            res["litellm"] = target(bench, "litellm", argv, env, port, ready, LITELLM_KEY)
            code = "import importlib.metadata as m; print(m.version('litellm'))"
            python = str(Path(exe).parent / "python")
            lite = {"litellm": harness.command_output([python, "-c", code])}
        bench.machine["versions"] = harness.proxy_versions() | lite
        bench.finish(res, report(res))
    return 0


if __name__ == "__main__":
    harness.main(main)
