"""Versions at load: a 90/10 canary, sticky users, and what a shadow costs the primary.

One nginx mock (bench/nginx.conf, core 1) serves two models, `model-a` and `model-b`; a
second nginx on the next port serves the shadow model. Sluice (core 0) has the aliases

    canary    model-a 90, model-b 10
    sticky    the same, sticky by the body's `user` field
    primary   model-a alone: served by a second Sluice without a shadow, and by the first
              with `shadow: {model: shadow, percent: 100}` (every request mirrored)

1. canary: --requests requests at concurrency --conns, counted by `x-sluice-model`: the
   share of model-b against 10% (the issue's bound: +-1.5 points).
2. sticky: the same number of requests from --users users (each `user` a few times, in
   shuffled order): users served by more than one version (target 0), and the share.
3. shadow: wrk --latency on `primary` through each Sluice in turn, --rounds rounds in
   alternating order, at c=1 and at --conns: p50 of the shadowed server against the other.

    python bench/versions.py [--requests 10000] [--users 500] [--rounds 6]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import harness
import mock_upstream as mock
import uvloop
import yaml
from harness import AUX, GATEWAY, HOST, Bench, BenchError, fmt, spread

MASTER_KEY = "sk-bench-master-versions"
TARGET_SHARE_POINTS, TARGET_SWITCHED, TARGET_P50_PCT = 1.5, 0, 5.0


def model(name: str, port: int) -> dict[str, Any]:
    """A model of one deployment on the mock at `port` (the mock's model name upstream)."""
    deployment = {
        "provider": "openai",
        "api_base": f"http://{HOST}:{port}/v1",
        "api_key": "os.environ/BENCH_UPSTREAM_KEY",
        "model": mock.MODEL,
        "timeout": {"connect": 2, "first_byte": 30, "total": 600},
        "max_concurrency": 256,
    }
    return {"name": name, "deployments": [deployment]}


def config(bench: Bench, mock_port: int, shadow: bool) -> dict[str, Any]:
    split = [{"model": "model-a", "weight": 90}, {"model": "model-b", "weight": 10}]
    primary: dict[str, Any] = {"name": "primary", "versions": [{"model": "model-a", "weight": 1}]}
    if shadow:
        primary["shadow"] = {"model": "shadow", "percent": 100}
    return {
        "server": {"host": HOST},
        "logging": {"level": "info", "access_log": True},
        "usage": {"enabled": False},
        "data_dir": str(bench.work / ("data-shadow" if shadow else "data-plain")),
        "auth": {"master_key": "os.environ/BENCH_MASTER_KEY"},
        "models": [
            model("model-a", mock_port),
            model("model-b", mock_port),
            model("shadow", mock_port + 1),
        ],
        "aliases": [
            {"name": "canary", "versions": split},
            {"name": "sticky", "versions": split, "sticky": {"by": "user"}},
            primary,
        ],
    }


def body(model: str, user: str | None = None) -> bytes:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi."}]}
    if user is not None:
        doc["user"] = user
    return json.dumps(doc, separators=(",", ":")).encode()


async def _send(url: str, bodies: list[tuple[str | None, bytes]], conns: int) -> list[Any]:
    """Each (user, body) once, from `conns` clients: (user, status, x-sluice-model)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"}
    out: list[tuple[str | None, int, str | None]] = []
    it = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns + 4)) as s:

        async def client() -> None:
            for user, data in it:
                status, model = 0, None
                try:
                    async with s.post(url, data=data, headers=headers) as resp:
                        await resp.read()
                        status, model = resp.status, resp.headers.get("x-sluice-model")
                except (TimeoutError, aiohttp.ClientError):
                    pass
                out.append((user, status, model))

        await asyncio.gather(*(client() for _ in range(conns)))
    return out


def canary(bench: Bench, url: str) -> dict[str, Any]:
    args = bench.args
    bodies = [(None, body("canary"))] * args.requests
    got, cpu = bench.measure("canary", lambda: uvloop.run(_send(url, bodies, args.conns)))
    models = Counter(m for _, status, m in got if status == 200)
    share = 100.0 * models["model-b"] / max(sum(models.values()), 1)
    return {
        "requests": len(got),
        "statuses": dict(Counter(s for _, s, _ in got)),
        "models": dict(models),
        "model_b_pct": share,
        "off_by_points": share - 10.0,
        "cpu": cpu,
    }


def sticky(bench: Bench, url: str) -> dict[str, Any]:
    args = bench.args
    users = [f"user-{i:05d}" for i in range(args.users)]
    order = [users[i % len(users)] for i in range(args.requests)]
    random.Random(args.seed).shuffle(order)
    bodies = [(u, body("sticky", u)) for u in order]
    got, cpu = bench.measure("sticky", lambda: uvloop.run(_send(url, bodies, args.conns)))
    seen: dict[str, set[str]] = defaultdict(set)
    for user, status, model in got:
        if status == 200 and user is not None and model is not None:
            seen[user].add(model)
    per_user = Counter(next(iter(v)) for v in seen.values() if len(v) == 1)
    models = Counter(m for _, status, m in got if status == 200)
    return {
        "requests": len(got),
        "users": len(seen),
        "statuses": dict(Counter(s for _, s, _ in got)),
        "switched_users": sum(len(v) > 1 for v in seen.values()),
        "users_by_model": dict(per_user),
        "users_model_b_pct": 100.0 * per_user["model-b"] / max(sum(per_user.values()), 1),
        "requests_model_b_pct": 100.0 * models["model-b"] / max(sum(models.values()), 1),
        "cpu": cpu,
    }


def shadow_rounds(bench: Bench, urls: dict[str, str]) -> dict[str, Any]:
    """wrk on `primary` through each server in turn, the order alternating by round."""
    args = bench.args
    data = body("primary").decode()
    out: dict[str, Any] = {}
    for conns in (1, args.conns):
        runs: dict[str, list[Any]] = {name: [] for name in urls}
        for r in range(args.rounds):
            for name in harness.rotation(list(urls), r):
                label = f"{name} c={conns} round {r + 1}"
                w, cpu = bench.measure(
                    label,
                    lambda n=name, c=conns: bench.wrk(
                        urls[n], c, args.duration, body=data, auth=MASTER_KEY, latency=True
                    ),
                )
                runs[name].append({"wrk": w, "others_pct": cpu.others_pct})
        ratios = [
            s["wrk"].latency_ms["50"] / p["wrk"].latency_ms["50"]
            for s, p in zip(runs["shadow"], runs["plain"], strict=True)
        ]
        rps = [
            s["wrk"].rps / p["wrk"].rps for s, p in zip(runs["shadow"], runs["plain"], strict=True)
        ]
        out[f"c{conns}"] = {"runs": runs, "p50_ratio": spread(ratios), "rps_ratio": spread(rps)}
        harness.log(f"shadow c={conns}: p50 ratio {spread(ratios)}, req/s ratio {spread(rps)}")
    return out


def shadow_stats(port: int) -> dict[str, Any]:
    _, _, text = harness.http("GET", f"http://{HOST}:{port}/metrics")
    lines = [
        line
        for line in text.decode().splitlines()
        if line.startswith(("sluice_shadow_requests_total", "sluice_shadow_matches_total"))
    ]
    return {"metrics": lines}


def report(res: dict[str, Any]) -> list[str]:
    tables = []
    if "canary" in res and "sticky" in res:
        tables.append(versions_table(res["canary"], res["sticky"]))
    if "shadow" in res:
        tables.append(shadow_table(res["shadow"]))
    return tables


def versions_table(c: dict[str, Any], s: dict[str, Any]) -> str:
    rows = [
        ["canary: model-b share of 200s", f"10% +- {TARGET_SHARE_POINTS:g} points",
         f"{c['model_b_pct']:.2f}% ({c['off_by_points']:+.2f} points; {c['models']})"],
        ["canary: statuses", "200", str(c["statuses"])],
        ["sticky: users served by more than one version", str(TARGET_SWITCHED),
         f"{s['switched_users']} of {s['users']}"],
        ["sticky: users on model-b / requests to model-b", "~10%",
         f"{s['users_model_b_pct']:.1f}% / {s['requests_model_b_pct']:.1f}%"],
        ["sticky: statuses", "200", str(s["statuses"])],
    ]  # fmt: skip
    return harness.table(["Metric", "Goal", "Measured"], rows)


def shadow_table(shadow: dict[str, Any]) -> str:
    rows = []
    for key, part in shadow.items():
        runs = part["runs"]

        def med(name: str, p: str, runs: dict[str, Any] = runs) -> str:
            return fmt(spread([x["wrk"].latency_ms[p] for x in runs[name]])["median"], 3)

        r, q = part["p50_ratio"], part["rps_ratio"]
        rows.append([
            key, f"{med('plain', '50')} / {med('shadow', '50')}",
            f"{r['median'] - 1:+.1%} ({r['low'] - 1:+.1%} .. {r['high'] - 1:+.1%})",
            f"{med('plain', '99')} / {med('shadow', '99')}",
            f"{q['median'] - 1:+.1%} ({q['low'] - 1:+.1%} .. {q['high'] - 1:+.1%})",
        ])  # fmt: skip
    head = ["primary", "p50 ms: no shadow / shadow 100%", "p50 change, median (range)",
            "p99 ms: no shadow / shadow", "req/s change"]  # fmt: skip
    return harness.table(head, rows)


def main() -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(tries=1)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="shadow rounds per concurrency")
    parser.add_argument("--duration", type=int, default=5, help="s per shadow wrk run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parts", default="canary,sticky,shadow")
    parser.add_argument(
        "--upstream-latency-ms",
        type=float,
        default=0.0,
        help="0: the nginx mocks; else `sluice mock-upstream --latency-ms` on both ports",
    )
    parser.add_argument("--mock-port", type=int, default=9400, help="the shadow's: the next")
    parser.add_argument("--port", type=int, default=8400, help="with shadow; without: +1")
    args = harness.parse(parser)
    env = {
        "BENCH_UPSTREAM_KEY": "sk-upstream",
        "BENCH_MASTER_KEY": MASTER_KEY,
        "PYTHONPATH": str(harness.REPO / "src"),
    }
    ports = {"shadow": args.port, "plain": args.port + 1}
    with Bench("versions", args) as bench:
        for port in (args.mock_port, args.mock_port + 1):
            if args.upstream_latency_ms:
                argv = [harness.venv_bin("sluice"), "mock-upstream", "--port", str(port)]
                argv += ["--latency-ms", str(args.upstream_latency_ms)]
                ready = f"http://{HOST}:{port}/mock/faults"
                bench.start(f"mock-{port}", argv, cores=AUX, env=env, ready=ready)
            else:
                mock.start(bench, port)
        configs, urls = {}, {}
        for name, port in ports.items():
            configs[name] = config(bench, args.mock_port, shadow=name == "shadow")
            path = bench.work / f"sluice-{name}.yaml"
            path.write_text(yaml.safe_dump(configs[name], sort_keys=False))
            argv = [harness.venv_bin("sluice"), "serve", "--config", str(path)]
            ready = f"http://{HOST}:{port}/readyz"
            bench.start(f"sluice-{name}", [*argv, "--port", str(port)], cores=GATEWAY, env=env,
                        ready=ready)  # fmt: skip
            urls[name] = f"http://{HOST}:{port}/v1/chat/completions"
        warm = [
            (None, body(m)) for m in itertools.islice(itertools.cycle(["canary", "primary"]), 400)
        ]
        for url in urls.values():
            if any(status != 200 for _, status, _ in uvloop.run(_send(url, warm, 8))):
                raise BenchError(f"warm-up through {url} failed")
        parts = args.parts.split(",")
        res: dict[str, Any] = {}
        if "canary" in parts:
            res["canary"] = canary(bench, urls["plain"])
        if "sticky" in parts:
            res["sticky"] = sticky(bench, urls["plain"])
        if "shadow" in parts:
            res["shadow"] = shadow_rounds(bench, urls)
            res["shadow_metrics"] = shadow_stats(ports["shadow"])
        bench.machine["versions"] = harness.versions("sluice-gateway", "aiohttp", "uvloop")
        bench.finish({"configs": configs, **res}, report(res))
    return 0


if __name__ == "__main__":
    harness.main(main)
