"""Soak: does the gateway's memory stay flat over a million requests?

For the accounting benchmark's `memory` and `redis` variants (bench/accounting_bench.py:
auth, limits and usage records on, the same configs and key): Sluice on core 0, the
nginx mock and wrk on core 1, wrk at --conns until --requests responses. Every
--interval s the server's RSS (/proc) and the requests it answered (/metrics) are
sampled. Reported: RSS after --warmup-fraction of the requests and at the end (target:
within 10%), the peak, and usage rows against the 200s after the server stops. --probe
starts the server under bench/memory_probe.py. Figures: docs/security/memory.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import accounting_bench as acct
import harness
import mock_upstream as mock
from harness import Bench, BenchError

TARGET_RSS_CHANGE_PCT = 10.0


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def load(bench: Bench, s: acct.Server) -> tuple[harness.Wrk, float]:
    """wrk until --requests responses: post.lua stops its thread and creates the done
    file, then wrk gets SIGINT and prints its summary."""
    args, done = bench.args, bench.work / "wrk.done"
    done.unlink(missing_ok=True)
    argv = bench.wrk_argv(s.url, args.conns, 3600)
    env = {**os.environ, "BENCH_BODY": mock.REQUEST_BODY, "BENCH_AUTH": s.key}
    env |= {"BENCH_REQUESTS": str(args.requests), "BENCH_DONE_FILE": str(done)}
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as p:
        while p.poll() is None and not done.exists():
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=60)[0].decode()
    return harness.parse_wrk(out, s.url, args.conns, 0), time.monotonic() - t0


def soak(bench: Bench, name: str) -> dict[str, Any]:
    args = bench.args
    command, env = None, {}
    if args.probe:
        command = [sys.executable, "bench/memory_probe.py"]
        env = {"SLUICE_PROBE_OUT": str(bench.work / f"probe-{name}.jsonl")}
        env |= {"SLUICE_PROBE_INTERVAL": str(args.interval * 2)}
    s = acct.start(bench, name, args.port, command or (), env)
    base = sum(s.answered().values())
    samples: list[dict[str, Any]] = [{"t": 0, "rss_kib": rss_kib(s.proc.pid), "answered": 0}]
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(args.interval):
            answered = sum(s.answered().values()) - base
            samples.append(
                {
                    "t": round(time.monotonic() - t0),
                    "rss_kib": rss_kib(s.proc.pid),
                    "answered": answered,
                }
            )

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wrk, wall = load(bench, s)
    finally:
        done.set()
        sampler.join()
    end = {"rss_kib": rss_kib(s.proc.pid), "answered": sum(s.answered().values()) - base}
    warm = next((x for x in samples if x["answered"] >= args.warmup_fraction * args.requests), end)
    change = 100 * (end["rss_kib"] / warm["rss_kib"] - 1)
    stopped = acct.stop(bench, s)
    return {
        "start": samples[0],
        "warm": warm,
        "end": end,
        "rss_change_pct": round(change, 1),
        "peak_rss_kib": max(x["rss_kib"] for x in [*samples, end]),
        "wall_s": round(wall),
        "wrk": wrk,
        "samples": samples,
        **stopped,
    }


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--variants", default="memory,redis")
    parser.add_argument("--interval", type=float, default=5.0, help="s between samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--probe", action="store_true", help="under bench/memory_probe.py")
    parser.add_argument("--mock-port", type=int, default=9170)
    parser.add_argument("--port", type=int, default=8170)
    args = harness.parse(parser)
    with Bench("soak", args) as bench:
        mock.start(bench, args.mock_port)
        res = {n: soak(bench, n) for n in args.variants.split(",")}
        rows = [
            [
                n,
                *(f"{r[k]['rss_kib'] / 1024:.1f} MiB" for k in ("start", "warm", "end")),
                f"{r['rss_change_pct']:+.1f}%",
                f"{r['peak_rss_kib'] / 1024:.1f} MiB",
                f"{r['answered'].get('200', 0):,}",
                f"{r.get('rows', 0):,}",
                f"{r['wall_s']} s",
            ]
            for n, r in res.items()
        ]
        head = ["variant", "RSS at start", f"after {args.warmup_fraction:.0%}", "at the end"]
        head += ["change", "peak", "200s", "usage rows", "wall"]
        bench.finish(res, [harness.table(head, rows)])
    ok = all(abs(r["rss_change_pct"]) <= TARGET_RSS_CHANGE_PCT for r in res.values())
    if not ok:
        raise BenchError(f"RSS moved by more than {TARGET_RSS_CHANGE_PCT}%")
    return 0


if __name__ == "__main__":
    harness.main(main)
