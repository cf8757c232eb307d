"""Reload under load: `POST /admin/reload` every --every s while wrk keeps c=--conns busy.

Sluice (core 0) serves the alias `gpt-4o-mini` over two models, `model-a` and `model-b`,
each one deployment on the nginx mock (core 1, with wrk and this script). While wrk posts
to the alias for --duration s, this script rewrites the config file's version weights
(written beside it, then renamed over it: a reader never sees half a file) and calls
`POST /admin/reload` with the master key, every --every s. Reported: wrk's requests,
non-2xx answers and socket errors (target: none), the reloads applied, and
sluice_config_generation before and after.

    python bench/reload.py [--duration 30] [--conns 32] [--every 2]
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

import harness
import mock_upstream as mock
import yaml
from harness import GATEWAY, HOST, Bench, BenchError
from versions import model

MASTER_KEY = "sk-bench-master-reload"
WEIGHTS = [(90, 10), (50, 50), (10, 90), (0, 100), (100, 0), (70, 30)]


def config(bench: Bench, mock_port: int, weights: tuple[int, int]) -> dict[str, Any]:
    versions = [
        {"model": m, "weight": w} for m, w in zip(("model-a", "model-b"), weights, strict=True)
    ]
    return {
        "server": {"host": HOST},
        "logging": {"level": "info", "access_log": True},
        "usage": {"enabled": False},
        "data_dir": str(bench.work / "data"),
        "auth": {"master_key": "os.environ/BENCH_MASTER_KEY"},
        "models": [model("model-a", mock_port), model("model-b", mock_port)],
        "aliases": [{"name": mock.MODEL, "versions": versions}],
    }


def write(path: Any, settings: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
    os.replace(tmp, path)


def generation(port: int) -> float | None:
    _, _, text = harness.http("GET", f"http://{HOST}:{port}/metrics")
    found = re.search(r"^sluice_config_generation(?:\{[^}]*\})? (\S+)", text.decode(), re.M)
    return float(found[1]) if found else None


def main() -> int:
    parser = harness.parser(__doc__)
    parser.set_defaults(tries=1)  # an outcome, not a speed: a disturbed run is noted
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--every", type=float, default=2.0, help="s between reloads")
    parser.add_argument("--mock-port", type=int, default=9500)
    parser.add_argument("--port", type=int, default=8500)
    args = harness.parse(parser)
    env = {
        "BENCH_UPSTREAM_KEY": "sk-upstream",
        "BENCH_MASTER_KEY": MASTER_KEY,
        "PYTHONPATH": str(harness.REPO / "src"),
    }
    base = f"http://{HOST}:{args.port}"
    auth = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
    with Bench("reload", args) as bench:
        mock.start(bench, args.mock_port)
        path = bench.work / "sluice.yaml"
        write(path, config(bench, args.mock_port, WEIGHTS[0]))
        argv = [harness.venv_bin("sluice"), "serve", "--config", str(path)]
        argv += ["--port", str(args.port)]
        bench.start("sluice", argv, cores=GATEWAY, env=env, ready=base + "/readyz")
        body = mock.REQUEST_BODY
        url = base + "/v1/chat/completions"
        bench.wrk(url, 8, 2, body=body, auth=MASTER_KEY)  # warm-up
        before = generation(args.port)
        reloads: list[dict[str, Any]] = []
        stop = threading.Event()

        def reloader() -> None:
            i, t0 = 1, time.monotonic()
            while not stop.wait(max(t0 + i * args.every - time.monotonic(), 0)):
                weights = WEIGHTS[i % len(WEIGHTS)]
                write(path, config(bench, args.mock_port, weights))
                sent = time.monotonic()
                status, _, data = harness.http("POST", base + "/admin/reload", "", auth)
                took = (time.monotonic() - sent) * 1000
                answer = json.loads(data) if status == 200 else data.decode()[:300]
                reloads.append({"weights": weights, "status": status, "ms": took, "answer": answer})
                i += 1

        def load() -> Any:
            try:
                return bench.wrk(
                    url, args.conns, args.duration, body=body, auth=MASTER_KEY, latency=True
                )
            finally:
                stop.set()

        def run() -> Any:
            stop.clear()
            return harness.together(load, reloader)[0]

        w, cpu = bench.measure("load with reloads", run)
        after = generation(args.port)
        applied = [r for r in reloads if r["status"] == 200 and r["answer"]["status"] == "applied"]
        if not reloads:
            raise BenchError("no reload was sent")
        res = {
            "wrk": w,
            "cpu": cpu,
            "reloads": reloads,
            "reloads_applied": len(applied),
            "generation_before": before,
            "generation_after": after,
        }
        ms = [r["ms"] for r in reloads]
        rows = [
            [f"requests (wrk, c={args.conns}, {args.duration} s)", "", f"{w.requests:,}"],
            ["req/s", "", f"{w.rps:,.0f}"],
            ["non-2xx answers", "0", str(w.non2xx)],
            ["socket errors", "0", str(w.socket_errors)],
            ["reloads sent / applied", "", f"{len(reloads)} / {len(applied)}"],
            ["sluice_config_generation before / after", "", f"{before:g} / {after:g}"],
            ["reload answer time p50 / max (ms)", "",
             f"{harness.pct(ms, 50):.1f} / {max(ms):.1f}"],
            ["p50 / p99 latency (ms)", "",
             f"{w.latency_ms['50']:.2f} / {w.latency_ms['99']:.2f}"],
        ]  # fmt: skip
        bench.machine["versions"] = harness.versions("sluice-gateway", "uvicorn", "uvloop")
        bench.finish(res, [harness.table(["Metric", "Goal", "Measured"], rows)])
    return 0


if __name__ == "__main__":
    harness.main(main)
