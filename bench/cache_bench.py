"""Caching (issue 20): cache hits against the plain proxy on one core, and a thundering herd.

Speed: nginx (bench/mock_upstream.py) on core 1; three Sluice servers from
bench/sluice-bench.yaml on core 0, loaded one at a time: `plain` (cache off), `hit` and
`miss` (`cache: {enabled: true}`; apart, so that the misses' stored answers do not grow the
store the hits are read from). Every request is deterministic (temperature 0). Rows:

    direct   nginx itself (c=1 only): the floor of the latency
    plain    Sluice with the cache off, the same body as `hit`
    hit      Sluice with the cache on, that body stored before the rounds: every request a hit
    miss     Sluice with the cache on, a body new to every request (wrk Lua): every request a
             miss that goes upstream and is stored, the price of the cache step on a miss

Each round runs wrk c=1 (--latency) then c=32 on every row, in an order that rotates from
round to round; the server's CPU per request is read from /proc around each run (on a
shared core it is steadier than req/s: `capacity` is plain's CPU per request over a row's).

Herd: `sluice mock-upstream --latency-ms 500` on core 1, a third Sluice (cache on) in front
of it, and N identical requests sent at once by an aiohttp client (core 1), cold (a body new
to each round); upstream calls from the mock's /mock/stats, results from x-sluice-cache.

    python bench/cache_bench.py --nice -10
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import harness
import mock_upstream as mock
import uvloop
from harness import AUX, GATEWAY, HOST, Bench, BenchError, Proc, Wrk, fmt, spread

UPSTREAM_KEY = "sk-upstream"
TARGET_HIT_RATIO, TARGET_HIT_OVERHEAD_MS, TARGET_HERD_CALLS = 1.5, 0.2, 1
ROWS = ("plain", "hit", "miss")
# A request for a new cache key every time: post.lua's request with "@N@" in the body
# replaced by a counter (a token of the run is in the body too, so runs never share keys).
UNIQUE_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
local head, tail = string.match(os.getenv("BENCH_BODY"), "^(.*)@N@(.*)$")
local n = 0
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. n .. tail)
end
"""


def body(note: str = "") -> str:
    messages = [{"role": "user", "content": f"Say hello.{note}"}]
    request = {"model": mock.MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
    return json.dumps(request, separators=(",", ":"))


@dataclass
class Run:
    wrk: Wrk
    cpu_us: float | None  # the server's CPU per request


@dataclass
class Target:
    name: str
    url: str
    proc: Proc | None
    body: Callable[[], str]
    script: str = "post.lua"


def load(bench: Bench, target: Target, conns: int, duration: int) -> Callable[[], Run]:
    def run() -> Run:
        before = target.proc.cpu_seconds() if target.proc else 0.0
        w = bench.wrk(
            target.url, conns, duration, body=target.body(), latency=True, script=target.script
        )
        if w.errors:
            raise BenchError(
                f"{target.name} c={conns}: {w.non2xx} non-2xx, {w.socket_errors} socket"
            )
        used = target.proc.cpu_seconds() - before if target.proc else None
        return Run(w, None if used is None else round(1e6 * used / max(w.requests, 1), 1))

    return run


def expect(url: str, body_: str, cache: str | None) -> None:
    """One request: 200, the mock's reply, and the x-sluice-cache `cache` says."""
    head = {"Content-Type": "application/json"}
    status, headers, data = harness.http("POST", url, body_, head, timeout=30)
    if status != 200 or b'"choices"' not in data:
        raise BenchError(f"POST {url} -> {status}: {data[:300]!r}")
    if headers.get("x-sluice-cache") != cache:
        raise BenchError(
            f"POST {url}: x-sluice-cache {headers.get('x-sluice-cache')!r}, not {cache!r}"
        )


def cache_counts(base: str) -> dict[str, float]:
    """sluice_cache_requests_total by result, from the server's /metrics."""
    _, _, text = harness.http("GET", base + "/metrics")
    found = re.findall(
        r'^sluice_cache_requests_total\{[^}]*result="([^"]+)"[^}]*\} (\S+)', text.decode(), re.M
    )
    return {result: float(v) for result, v in found}


def speed(bench: Bench, targets: dict[str, Target], direct: Target) -> dict[str, Any]:
    args = bench.args
    expect(targets["plain"].url, targets["plain"].body(), None)
    expect(targets["hit"].url, targets["hit"].body(), "miss")
    expect(targets["hit"].url, targets["hit"].body(), "hit")
    expect(targets["miss"].url, body(" (sanity)"), "miss")
    for t in targets.values():
        bench.wrk(t.url, 8, args.warmup, body=t.body(), script=t.script)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        out: dict[str, Any] = {}
        for conns in (1, 32):
            names = harness.rotation(ROWS, r) + (["direct"] if conns == 1 else [])
            for name in names:
                t = direct if name == "direct" else targets[name]
                run, cpu = bench.measure(
                    f"round {r + 1} {name} c={conns}", load(bench, t, conns, args.duration)
                )
                out[f"{name} c={conns}"] = {"run": run, "cpu": cpu}
        rounds.append(out)
        c32 = ", ".join(f"{n} {rps(out[n + ' c=32']['run']):,.0f}" for n in ROWS)
        c1 = ", ".join(f"{n} {p50(out[n + ' c=1']['run'])}" for n in ("direct", *ROWS))
        harness.log(f"round {r + 1}: req/s c=32: {c32}; p50 c=1 (ms): {c1}")
    return {"rounds": rounds}


async def _herd(url: str, body_: str, n: int) -> list[tuple[int, str, float]]:
    head = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, str, float]:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body_, headers=head) as resp:
                    data = await resp.read()
                    ok = resp.status == 200 and b'"choices"' in data
                    how = resp.headers.get("x-sluice-cache", "none") if ok else "error"
                    return resp.status, how, 1000 * (time.perf_counter() - t0)
            except (TimeoutError, aiohttp.ClientError) as e:
                return 0, type(e).__name__, 1000 * (time.perf_counter() - t0)

        return await asyncio.gather(*(one() for _ in range(n)))


def herd(bench: Bench, url: str, mock_base: str) -> list[dict[str, Any]]:
    args, counter, out = bench.args, itertools.count(1), []

    def run() -> dict[str, Any]:
        harness.http("POST", mock_base + "/mock/reset")
        answers = uvloop.run(
            _herd(url, body(f" (herd {time.time_ns()}-{next(counter)})"), args.herd)
        )
        stats = json.loads(harness.http("GET", mock_base + "/mock/stats")[2])
        ms = [a[2] for a in answers]
        return {
            "upstream_calls": stats["by_route"].get("chat/completions", 0),
            "results": dict(Counter(a[1] for a in answers)),
            "statuses": dict(Counter(a[0] for a in answers)),
            "p50_ms": harness.pct(ms, 50), "p99_ms": harness.pct(ms, 99), "max_ms": max(ms),
        }  # fmt: skip

    for r in range(args.herd_rounds):
        value, cpu = bench.measure(f"herd {r + 1}", run)
        out.append(value | {"cpu": cpu})
        harness.log(f"herd {r + 1}: {value['upstream_calls']} upstream call(s), {value['results']}")
    return out


# ------------------------------------------------------------------ figures


def p50(run: Run) -> float:
    return run.wrk.latency_ms["50"]


def rps(run: Run) -> float:
    return run.wrk.rps


def cpu_us(run: Run) -> float:
    return run.cpu_us or float("nan")


def cell(values: list[float], digits: int) -> str:
    """Median (lowest-highest) of per-round values."""
    if not values:
        return "n/a"
    s = spread(values)
    return f"{fmt(s['median'], digits)} ({fmt(s['low'], digits)}-{fmt(s['high'], digits)})"


HEADS = {
    "direct": "nginx direct",
    "plain": "plain proxy (cache off)",
    "hit": "cache hit",
    "miss": "cache miss (a new key each request)",
}


def report(res: dict[str, Any]) -> list[str]:
    rounds = res["speed"]["rounds"]

    def series(key: str, get: Callable[[Run], float | None]) -> list[float]:
        return [v for v in (get(r[key]["run"]) for r in rounds) if v is not None]

    def per_round(a: str, b: str, get: Callable[[Run], float], op: str) -> list[float]:
        """a / b or a - b, round by round."""
        pairs = [(get(r[a]["run"]), get(r[b]["run"])) for r in rounds]
        return [x / y if op == "/" else x - y for x, y in pairs]

    def others(name: str) -> str:
        cpus = [r[k]["cpu"].others_pct for r in rounds for k in r if k.startswith(name + " ")]
        return f"{max(cpus):.0f}"

    rows = []
    for name in ("direct", *ROWS):
        c1, c32 = f"{name} c=1", f"{name} c=32"
        loaded = [] if name == "direct" else [
            cell(series(c32, rps), 0),
            cell(per_round(c32, "plain c=32", rps, "/"), 2),
            cell(series(c32, lambda run: run.cpu_us), 0),
            cell(per_round("plain c=32", c32, cpu_us, "/"), 2),
        ]  # fmt: skip
        rows.append([
            HEADS[name],
            *(loaded or ["", "", "", ""]),
            cell(series(c1, p50), 3),
            cell(series(c1, lambda run: run.wrk.latency_ms["99"]), 3),
            cell(per_round(c1, "direct c=1", p50, "-"), 3),
            others(name),
        ])  # fmt: skip
    header = [
        "Row", "req/s c=32", "x plain", "CPU us/request c=32", "capacity x plain",
        "p50 c=1 (ms)", "p99 c=1 (ms)",
        "p50 - direct (ms)", "others' CPU, most (% of a core)",
    ]  # fmt: skip
    tables = [harness.table(header, rows)]
    herd_rows = [
        [
            i + 1,
            h["upstream_calls"],
            ", ".join(f"{k} {v}" for k, v in sorted(h["results"].items())),
            f"{h['p50_ms']:.0f} / {h['p99_ms']:.0f} / {h['max_ms']:.0f}",
            f"{h['cpu'].others_pct:.0f}",
        ]
        for i, h in enumerate(res["herd"])
    ]
    header = "Herd round | upstream calls | x-sluice-cache | p50 / p99 / max (ms) | others' CPU (%)"
    tables.append(harness.table(header, herd_rows))
    ratio = per_round("hit c=32", "plain c=32", rps, "/")
    overhead = per_round("hit c=1", "direct c=1", p50, "-")
    calls = [h["upstream_calls"] for h in res["herd"]]
    ok = {True: "met", False: "missed"}
    targets = [
        ["cache hits / plain proxy, req/s c=32, one core", f">= {TARGET_HIT_RATIO}",
         cell(ratio, 2), ok[min(ratio) >= TARGET_HIT_RATIO]],
        ["hit p50 overhead vs nginx direct, c=1", f"<= {TARGET_HIT_OVERHEAD_MS} ms",
         cell(overhead, 3), ok[statistics.median(overhead) <= TARGET_HIT_OVERHEAD_MS]],
        [f"upstream calls, {res['herd_size']:,} identical requests at once",
         str(TARGET_HERD_CALLS), ", ".join(map(str, calls)),
         ok[all(c == TARGET_HERD_CALLS for c in calls)]],
    ]  # fmt: skip
    tables.append(harness.table("Target | Goal | Measured | Status", targets))
    return tables


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="s per wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="s of wrk c=8 per row")
    parser.add_argument("--herd", type=int, default=1000, help="identical requests at once")
    parser.add_argument("--herd-rounds", type=int, default=3)
    parser.add_argument("--herd-latency-ms", type=float, default=500.0, help="the mock's")
    parser.add_argument("--mock-port", type=int, default=9700, help="nginx; the herd's mock: +1")
    parser.add_argument("--port", type=int, default=8700, help="plain; hit, miss, herd: +1..3")
    args = harness.parse(parser)
    env = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONPATH": str(harness.REPO / "src")}
    sluice = harness.venv_bin("sluice")
    res: dict[str, Any] = {"herd_size": args.herd}
    with Bench("cache", args) as bench:
        mock.start(bench, args.mock_port)
        herd_mock = f"http://{HOST}:{args.mock_port + 1}"
        argv = [sluice, "mock-upstream", "--port", str(args.mock_port + 1)]
        argv += ["--latency-ms", str(args.herd_latency_ms)]
        bench.start("mock-herd", argv, cores=AUX, env=env, ready=herd_mock + "/mock/stats")
        urls, procs = {}, {}
        for i, name in enumerate((*ROWS, "herd")):
            port = args.port + i
            upstream = args.mock_port + (1 if name == "herd" else 0)
            cache = None if name == "plain" else {"enabled": True}
            config = mock.config(
                bench, "bench/sluice-bench.yaml", f"sluice-{name}", upstream, cache=cache
            )
            argv = [sluice, "serve", "--config", config, "--port", str(port)]
            base = f"http://{HOST}:{port}"
            procs[name] = bench.start(
                f"sluice-{name}", argv, cores=GATEWAY, env=env, ready=base + "/readyz"
            )
            urls[name] = base
        chat = "/v1/chat/completions"
        lua = bench.work / "unique.lua"
        lua.write_text(UNIQUE_LUA)
        runs = itertools.count(1)
        targets = {
            "plain": Target("plain", urls["plain"] + chat, procs["plain"], body),
            "hit": Target("hit", urls["hit"] + chat, procs["hit"], body),
            "miss": Target(
                "miss", urls["miss"] + chat, procs["miss"],
                lambda: body(f" ({time.time_ns()}-{next(runs)}-@N@)"), str(lua),
            ),
        }  # fmt: skip
        direct = Target("direct", f"http://{HOST}:{args.mock_port}{chat}", None, body)
        res["speed"] = speed(bench, targets, direct)
        for name in ROWS:
            res["speed"][f"{name}_cache_metrics"] = cache_counts(urls[name])
            bench.stop(procs[name])
        res["herd"] = herd(bench, urls["herd"] + chat, herd_mock)
        res["herd_metrics"] = cache_counts(urls["herd"])
        bench.machine["versions"] = harness.proxy_versions()
        bench.finish(res, report(res))
    return 0


if __name__ == "__main__":
    harness.main(main)
