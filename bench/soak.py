#!/usr/bin/env python3
"""Soak benchmark: does the gateway's memory stay flat over a million requests?

For each configuration (``memory``: MemoryLimiter + SQLite usage records; ``redis``: limits
in Redis, keys and usage in a fresh PostgreSQL database), with auth, limits and usage
records on, exactly as bench/accounting_bench.py sets them up (its configs, virtual key and
helpers, imported unchanged): Sluice on core 0, the nginx mock and wrk on core 1, wrk at
c=32 until ``--requests`` responses (bench/soak.lua). Every ``--interval`` seconds the
server's RSS (/proc/PID/status) and the requests it has answered (/metrics) are sampled.

Reported per configuration, printed and written as JSON to bench/.work/soak/:
RSS once ``--warmup-fraction`` of the requests are answered and at the end, the change
(target: within +-10 %), the peak, requests answered (200s; other statuses apart) and the
usage rows in the database after the server has stopped (target: rows == 200s).

``--probe`` starts the server through bench/memory_probe.py, whose sampler thread writes
tracemalloc/gc/malloc/SQLite figures beside the RSS (``--tracemalloc N`` turns tracemalloc
on: several times slower; for finding a leak, not for the soak's figures).

Usage (repo root, sluice venv active):

    python bench/soak.py [--requests 1000000] [--variants memory,redis] [--probe]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accounting_bench as ab
import gateway_bench as gb

REPO = gb.REPO
OUT = gb.WORK / "soak"
TARGET_RSS_CHANGE_PCT = 10.0


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def answered(port: int) -> dict[str, int]:
    try:
        return ab.served_count(port)
    except (OSError, gb.BenchError):
        return {}


def start_sluice(
    pm: gb.ProcessManager, v: ab.Variant, pg: ab.PgDatabase | None, args: argparse.Namespace
) -> tuple[gb.Proc, str]:
    """The variant's server, as accounting_bench starts it, or under the memory probe."""
    assert v.data_dir is not None
    shutil.rmtree(REPO / v.data_dir, ignore_errors=True)
    serve = ["--config", ab.render_config(v, args.sluice_port), "--host", gb.HOST]
    serve += ["--port", str(args.sluice_port), "--workers", "1"]
    env = dict(os.environ, **ab.sluice_env(v, pg))
    for k in ("SLUICE_CONFIG", "DATABASE_URL"):
        env.pop(k, None)
    if args.probe:
        probe_out = OUT / f"probe-{v.name}.jsonl"
        probe_out.unlink(missing_ok=True)
        env.update(
            SLUICE_PROBE_OUT=str(probe_out),
            SLUICE_PROBE_INTERVAL=str(args.interval * 2),
            SLUICE_PROBE_TRACEMALLOC=str(args.tracemalloc),
        )
        exe = [gb.venv_bin("python") or sys.executable, str(gb.BENCH / "memory_probe.py")]
    else:
        sluice = gb.venv_bin("sluice")
        if sluice is None:
            raise gb.BenchError("`sluice` executable not found; activate the repo's .venv")
        exe = [sluice, "serve"]
    argv = [*gb.pin(gb.GATEWAY_CORE), *exe, *serve]
    proc = pm.start(f"sluice-{v.name}", argv, OUT / f"sluice-{v.name}.log", env=env)
    shown = {k: val for k, val in ab.sluice_env(v, pg).items() if k != "BENCH_DATABASE_URL"}
    if v.postgres:
        shown["BENCH_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/<fresh db>"
    command = " ".join(f"{k}={val}" for k, val in shown.items()) + " " + shlex.join(argv)
    return proc, command


def run_wrk(url: str, key: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """wrk at ``--conns`` until ``--requests`` responses: soak.lua stops its thread and
    creates the done file, then wrk is sent SIGINT (it prints its summary and exits)."""
    argv = [*gb.pin(gb.AUX_CORE), "wrk", "-t1", f"-c{args.conns}", "-d3600s"]
    argv += ["--timeout", "10s", "-s", str(gb.BENCH / "soak.lua"), url]
    done = OUT / "wrk.done"
    done.unlink(missing_ok=True)
    env = dict(os.environ, BENCH_BODY=gb.REQUEST_BODY, BENCH_AUTH=key)
    env.update(BENCH_REQUESTS=str(args.requests), BENCH_DONE_FILE=str(done))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as p:
        while p.poll() is None and not done.exists():
            time.sleep(0.2)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=60)[0].decode("utf-8", "replace")
    if "Requests/sec" not in out:
        raise gb.BenchError(f"wrk failed (rc {p.returncode}): {out}")
    return out, argv


def sample_while(
    proc: gb.Proc, port: int, base: int, interval: float, done: threading.Event
) -> list[Any]:
    """RSS and requests answered since ``base``, every ``interval`` s until ``done``."""
    samples: list[Any] = []
    t0 = time.monotonic()
    while not done.wait(interval):
        samples.append(
            {
                "t": round(time.monotonic() - t0, 1),
                "rss_kib": rss_kib(proc.popen.pid),
                "answered": sum(answered(port).values()) - base,
            }
        )
    return samples


def soak(
    pm: gb.ProcessManager, v: ab.Variant, args: argparse.Namespace, pg: ab.PgDatabase | None
) -> dict[str, Any]:
    if pg is not None:
        pg.create()
    proc, command = start_sluice(pm, v, pg, args)
    port = args.sluice_port
    r: dict[str, Any] = {"variant": v.label, "sluice": command, "load_at_start": _load()}
    try:
        gb.wait_ready(proc, f"http://{gb.HOST}:{port}/readyz", args.ready_timeout)
        key_id, key = ab.create_key(port)
        r["key"] = {"id": key_id, **ab.KEY_SPEC}
        ab.check_limited(port, key)  # one 200 (with its usage row) and one 401
        before = answered(port)
        base = sum(before.values())
        r["start"] = {"rss_kib": rss_kib(proc.popen.pid), "answered": 0}
        log(f"{v.name}: {args.requests:,} requests at c={args.conns}")
        samples: list[Any] = []
        done = threading.Event()
        sampler = threading.Thread(
            target=lambda: samples.extend(sample_while(proc, port, base, args.interval, done))
        )
        sampler.start()
        t0 = time.monotonic()
        try:
            out, argv = run_wrk(f"http://{gb.HOST}:{port}/v1/chat/completions", key, args)
        finally:
            done.set()
            sampler.join()
        r["wall_s"] = round(time.monotonic() - t0, 1)
        after = answered(port)
        r["end"] = {"rss_kib": rss_kib(proc.popen.pid), "answered": sum(after.values()) - base}
        r["wrk"] = f"BENCH_REQUESTS={args.requests} {shlex.join(argv)}"
        r["wrk_output"] = out
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        r["wrk_non2xx"] = int(m.group(1)) if m else 0
        warm_at = args.warmup_fraction * args.requests
        r["warm"] = next((s for s in samples if s["answered"] >= warm_at), r["end"])
        r["samples"] = samples
        r["peak_rss_kib"] = max([s["rss_kib"] for s in samples] + [r["end"]["rss_kib"]])
        r["rss_change_pct"] = round(100.0 * (r["end"]["rss_kib"] / r["warm"]["rss_kib"] - 1), 1)
        r["soak_by_status"] = {k: n - before.get(k, 0) for k, n in after.items()}
        r["by_status"] = after
    finally:
        pm.stop(proc, timeout=60)
    r["load_at_end"] = _load()
    # Every 200 the server answered (the soak's and check_limited's) must have its row.
    r["served"] = ab.accepted(r.get("by_status", {}))
    r["rows"] = ab.count_rows(v, pg)
    r["rows_match"] = r["rows"] == r["served"]
    r["rss_within_target"] = abs(r.get("rss_change_pct", 1e9)) <= TARGET_RSS_CHANGE_PCT
    return r


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def summary(r: dict[str, Any]) -> str:
    def mib(sample: dict[str, Any]) -> str:
        return f"{sample['rss_kib'] / 1024:.1f} MiB"

    soak = r["soak_by_status"]
    others = {k: n for k, n in soak.items() if k != "200" and n}
    return (
        f"{r['variant']}: RSS at start {mib(r['start'])}, after warm-up "
        f"({r['warm']['answered']:,} answered) {mib(r['warm'])}, at the end {mib(r['end'])} "
        f"({r['rss_change_pct']:+.1f} %; target within {TARGET_RSS_CHANGE_PCT:.0f} %: "
        f"{'met' if r['rss_within_target'] else 'MISSED'}), peak {r['peak_rss_kib'] / 1024:.1f}"
        f" MiB; soak: {soak.get('200', 0):,} answered 200, other statuses {others or 'none'}; "
        f"usage rows {r['rows']:,} for {r['served']:,} 200s in all "
        f"({'equal' if r['rows_match'] else 'MISMATCH'}); {r['wall_s']:.0f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--variants", default="memory,redis", help="memory, redis or both")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--warmup-fraction", type=float, default=0.1)
    ap.add_argument("--probe", action="store_true", help="run under bench/memory_probe.py")
    ap.add_argument("--tracemalloc", type=int, default=0, help="frames (with --probe)")
    ap.add_argument("--nginx-port", type=int, default=9170)
    ap.add_argument("--sluice-port", type=int, default=8170)
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    args.variant_names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not set(args.variant_names) <= {"memory", "redis"}:
        ap.error("--variants: memory and/or redis")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gb.NGINX_PORT = args.nginx_port
    gb.OUT = ab.OUT = OUT
    OUT.mkdir(parents=True, exist_ok=True)
    facts = gb.machine_facts()
    os.sched_setaffinity(0, {int(gb.AUX_CORE)})
    signal.signal(signal.SIGTERM, gb._raise_sigterm)
    pm = gb.ProcessManager()
    results: dict[str, Any] = {}
    try:
        gb.require_ports({"nginx mock": gb.NGINX_PORT, "sluice": args.sluice_port})
        with tempfile.TemporaryDirectory(prefix="sluice-soak-") as tmp:
            commands: dict[str, str] = {}
            gb.start_nginx(pm, Path(tmp), commands)
            for v in ab.VARIANTS:
                if v.name in args.variant_names:
                    pg = ab.PgDatabase("_soak") if v.postgres else None
                    try:
                        results[v.name] = soak(pm, v, args, pg)
                    finally:
                        if pg is not None:
                            pg.drop()
                    log(summary(results[v.name]))
            results["nginx"] = commands["nginx"]
    except gb.BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        pm.stop_all()
    la = os.getloadavg()
    results["machine"] = {
        **facts,
        "load_average_at_end": f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}",
    }
    results["args"] = {k: v for k, v in vars(args).items()}
    path = OUT / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    for name in args.variant_names:
        if name in results:
            print(summary(results[name]))
    log(f"results: {path.relative_to(REPO)}")
    ok = all(
        results[n]["rows_match"] and results[n]["rss_within_target"]
        for n in args.variant_names
        if n in results
    )
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
