"""Instructions per request of the accounting variants, counted by callgrind: a cost figure
that does not move with the machine's speed.

Each variant of bench/accounting_bench.py runs as one `sluice serve` under `valgrind
--tool=callgrind --instr-atstart=no` on core 0, in front of the nginx mock (core 1). hey
(core 1, 32 connections, the benchmark's request and key) warms it up uninstrumented,
then instrumentation is on for exactly --requests requests, and the count is divided by
the requests answered. Valgrind slows the server ~50x, so time-driven work is kept at its
real-run share: key cache TTL 600 s (not 5 s) and usage flush interval 30 s (batches are
written when 500 records wait, as under real load). User-space instructions only: not the
kernel, cache misses or mispredictions. Needs valgrind and hey (Debian packages).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import accounting_bench as acct
import harness
import mock_upstream as mock
from harness import AUX, Bench, BenchError


def hey(bench: Bench, s: acct.Server, n: int) -> int:
    """n requests from 32 connections; the 200s hey counted (anything else fails)."""
    body = bench.work / "body.json"
    body.write_text(mock.REQUEST_BODY)
    argv = [
        *bench.pin(AUX),
        "hey",
        "-n",
        str(n),
        "-c",
        "32",
        "-m",
        "POST",
        "-T",
        "application/json",
    ]
    argv += ["-D", str(body), "-H", f"Authorization: Bearer {s.key}", s.url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if set(codes) != {"200"} or "Error distribution" in out:
        raise BenchError(f"{s.name}: answers other than 200:\n{out}")
    return int(codes["200"])


def instructions(bench: Bench, name: str, port: int) -> dict[str, float]:
    out = bench.work / f"callgrind.{name.replace('@', '-')}"
    for old in bench.work.glob(out.name + "*"):
        old.unlink()
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    env = {"SLUICE_USAGE__FLUSH_INTERVAL": "30", "SLUICE_AUTH__KEY_CACHE_TTL": "600"}
    s = acct.start(
        bench,
        name,
        port,
        command=[*valgrind, sys.executable, "-m", "sluice", "serve"],
        env=env,
        timeout=300,
    )
    try:
        hey(bench, s, bench.args.warmup)
        time.sleep(1.5)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(s.proc.pid)], check=True, capture_output=True
        )
        t0 = time.monotonic()
        answered = hey(bench, s, bench.args.requests)
        seconds = time.monotonic() - t0
        time.sleep(1.5)  # what the usage writer still holds is not this window's
        subprocess.run(
            ["callgrind_control", "-d", str(s.proc.pid)], check=True, capture_output=True
        )
        time.sleep(1)
    finally:
        acct.stop(bench, s)
    total = 0
    for path in Path(out.parent).glob(out.name + ".*"):
        found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
        total = max(total, int(found[1]) if found else 0)
    return {"per_request": total / answered, "requests": answered, "seconds": round(seconds)}


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("variants", nargs="+", help=", ".join(acct.VARIANTS) + "; NAME@base")
    parser.add_argument("--requests", type=int, default=2016)
    parser.add_argument("--warmup", type=int, default=3008)
    parser.add_argument("--mock-port", type=int, default=mock.PORT)
    parser.add_argument("--base-src", help="the src/ folder NAME@base variants run on")
    args = harness.parse(parser)
    with Bench("instructions", args) as bench:
        mock.start(bench, args.mock_port)
        res = {}
        for i, name in enumerate(args.variants):
            res[name] = instructions(bench, name, 8181 + i)
            harness.log(f"{name}: {res[name]['per_request'] / 1e3:,.1f} k instructions a request")
        first = res[args.variants[0]]["per_request"]
        rows = [
            [
                n,
                f"{r['per_request'] / 1e3:,.1f}",
                f"{first / r['per_request']:.3f}",
                f"{(r['per_request'] - first) / 1e3:+,.1f}",
                f"{r['requests']:,}",
            ]
            for n, r in res.items()
        ]
        head = [
            "variant",
            "k instructions / request",
            f"{args.variants[0]} / variant",
            "extra (k)",
            "requests",
        ]
        bench.machine["valgrind"] = harness.command_output(["valgrind", "--version"])
        bench.finish(res, [harness.table(head, rows)])
    return 0


if __name__ == "__main__":
    harness.main(main)
