#!/usr/bin/env python3
"""Instructions per request of Sluice's variants, counted by callgrind: a deterministic
cost figure for a machine whose speed drifts by tens of percent within minutes.

Each variant of bench/accounting_breakdown.py (plain, master, nolim, lim, full, usage) runs
as one `sluice serve` under `valgrind --tool=callgrind --instr-atstart=no`, pinned to core
0, in front of the same nginx mock (core 1). `hey` (core 1, 32 connections, the benchmark's
request body) warms it up uninstrumented, then instrumentation is switched on for exactly
REQUESTS requests (callgrind_control -i on, then a dump), and the count is divided by the
requests answered. A variant written NAME@base runs on $BENCH_BASE_SRC (A/B of two trees).

Two settings are changed against the benchmark configs, both to keep time-driven work at
its real-run share while valgrind slows the server ~50x: the key cache TTL is 600 s (at 5
s, a slowed run would look the key up every few hundred requests instead of every ~30,000)
and the usage flush interval is 30 s (batches are then written when 500 records wait, as
under real load, not every 0.5 s in batches of a few dozen).

What it does not count: the kernel (system calls are equal across variants but for the
access log's writes), cache misses and branch mispredictions (the in-server cost of a
Python instruction is higher than in a tight loop). The ratio of instructions tracked the
interleaved req/s ratio within a few points when both were measured (0.705 vs ~0.70).

    python bench/accounting_instructions.py [--requests 2016] [--warmup 3008] \
        [--write-docs] plain lim full

Needs valgrind, hey and nginx (Debian packages: apt-get install valgrind hey nginx).
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accounting_breakdown as ab
import gateway_bench as gb

WORK = ab.AB / "instructions"


def hey(port, auth, n, body):
    """n requests from 32 connections; returns the 200s counted by hey."""
    cmd = ["taskset", "-c", "1", "hey", "-n", str(n), "-c", "32", "-m", "POST"]
    cmd += ["-T", "application/json", "-D", str(body)]
    if auth:
        cmd += ["-H", f"Authorization: Bearer {auth}"]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if set(codes) != {"200"} or "Error distribution" in out:
        raise SystemExit(f"port {port}: answers other than 200:\n{out}")
    return int(codes["200"])


def collected(prefix):
    """Instructions in the dump callgrind_control -d wrote (the largest 'summary:')."""
    total = 0
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
                    break
    return total


def measure(name, index, args, body):
    port = 8181 + index
    cfg, mode, slug, env = ab.server_setup(name, port, WORK / "data")
    env["SLUICE_USAGE__FLUSH_INTERVAL"] = "30"
    env["SLUICE_AUTH__KEY_CACHE_TTL"] = "600"
    out = str(WORK / f"callgrind.{slug}")
    for path in glob.glob(out + "*"):
        os.remove(path)
    argv = ["taskset", "-c", "0", "valgrind", "--tool=callgrind", "--instr-atstart=no"]
    argv += [f"--callgrind-out-file={out}", ab.PY, "-m", "sluice", "serve", "--config", str(cfg)]
    proc = ab.start(argv, f"instructions-{slug}.log", env)
    try:
        ab.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=300)
        auth = ab.create_key(mode, port)
        hey(port, auth, args.warmup, body)
        time.sleep(1.5)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        started = time.time()
        answered = hey(port, auth, args.requests, body)
        seconds = time.time() - started
        time.sleep(1.5)  # what the usage writer still holds is not this run's
        control = ["callgrind_control", "-d", str(proc.pid)]
        subprocess.run(control, check=True, capture_output=True)
        time.sleep(1)
    finally:
        ab.cleanup()
        ab.procs.clear()
    return collected(out) / answered, answered, seconds


def base_note(variants):
    """What NAME@base variants ran on, for the docs."""
    if not any("@" in variant for variant in variants):
        return ""
    tree = Path(os.environ["BENCH_BASE_SRC"]).parent
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return f"; NAME@base = the same variant on commit {commit or tree}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--requests", type=int, default=2016)
    parser.add_argument("--warmup", type=int, default=3008)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    began = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    ab.write_configs()
    body = WORK / "body.json"
    body.write_text(gb.REQUEST_BODY)
    results = []
    for i, name in enumerate(args.variants):
        ab.nginx()
        per_request, answered, seconds = measure(name, i, args, body)
        results.append((name, per_request, answered, seconds))
        print(
            f"{name:12s} {per_request / 1e3:8.1f} k instructions/request"
            f" ({answered} in {seconds:.0f} s)",
            flush=True,
        )
    base = results[0][1]
    rows = [
        f"| {name} | {per / 1e3:,.1f} | {base / per:.3f} | {(per - base) / 1e3:+,.1f} | {n:,} |"
        for name, per, n, _ in results
    ]
    table = "\n".join(
        [
            f"| variant | k instructions / request | {results[0][0]} / variant | extra (k)"
            " | requests |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print("\n" + table)
    if args.write_docs:
        versions = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ab.REPO
        ).stdout.strip()
        argv = [a for a in sys.argv[1:] if a != "--write-docs"]
        command = "python bench/accounting_instructions.py " + " ".join(argv)
        if any(variant.startswith("redis") for variant in args.variants):
            command = f"BENCH_DATABASE_URL=<a fresh PostgreSQL database> {command}"
        if any("@" in variant for variant in args.variants):
            command = f"BENCH_BASE_SRC={os.environ['BENCH_BASE_SRC']} {command}"
        when = time.strftime("%Y-%m-%d %H:%M")
        runtime = time.time() - began
        section = "\n\n".join(
            [
                "## Accounting cost in instructions (callgrind)",
                "Instructions per request of variants of `bench/accounting_breakdown.py`,"
                " counted by callgrind, so the figure does not move with this machine's speed."
                f" Generated by `bench/accounting_instructions.py` (last run {when}, commit"
                f" {commit}, {versions.strip()}, total script runtime {runtime:.0f} s).",
                "Each variant is one `sluice serve` under `valgrind --tool=callgrind"
                " --instr-atstart=no` on core 0, in front of the nginx mock (core 1);"
                f" `hey -c 32` (core 1) sends {args.warmup:,} uninstrumented warm-up requests,"
                f" then instrumentation is on for {args.requests:,} requests. Key cache TTL"
                " 600 s and usage flush interval 30 s, so that time-driven work keeps its"
                " real-run share while valgrind slows the server (see the script's docstring)."
                " User-space instructions only: the kernel, cache misses and mispredictions"
                " are not in it. Every variant is sent the same requests, `Authorization:"
                " Bearer` included (plain's key a stand-in it ignores). Variants: plain = no"
                " auth, usage off; lim = virtual key with"
                " RPM/TPM/parallel limits, usage off; full = lim + usage records in SQLite (the"
                " memory/SQLite variant of the section above); redis = full with limits in"
                " Redis and keys and usage in PostgreSQL (the Redis/PostgreSQL variant;"
                " variants sharing a database add to its tables); rlim = lim with the limits"
                " in Redis; pgusage = usage records in PostgreSQL alone"
                + base_note(args.variants)
                + ".",
                f"```sh\n{command}\n```",
                table,
            ]
        )
        gb.write_section("accounting-instructions", section)


if __name__ == "__main__":
    main()
