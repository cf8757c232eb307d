#!/usr/bin/env python3
"""Where the accounting path's cost goes: interleaved A/B of Sluice with parts of it on.

Variants (each one Sluice process on core 0, 1 worker, access log on; nginx mock and wrk
on core 1, as in bench/gateway_bench.py; wrk -c32 against /v1/chat/completions):

    plain   no auth, usage off (bench/sluice-bench.yaml's settings)
    master  the master key, usage off                 -> the cost of authentication
    nolim   a virtual key without limits, usage off   -> + key look-up and admission
    lim     a virtual key with RPM/TPM/parallel limits -> + limiter and x-ratelimit-* headers
    full    the same with usage records in SQLite     -> bench/sluice-accounting-memory.yaml
    usage   no auth, usage records in SQLite          -> the usage path alone
    redis   limits in Redis, keys and usage in PostgreSQL (needs BENCH_DATABASE_URL, a
            database the caller created) -> bench/sluice-accounting-redis.yaml
    rlim    redis's limits alone (usage off)     pgusage  redis's usage records alone (no auth)

Every variant's server is up at once; rounds run each variant for DURATION seconds in a
rotating order, and the result is the median of per-round ratios to the first variant,
with the server's CPU time per request (utime + stime from /proc over the requests wrk
counted) and each run's p50/p99 latency; ``BENCH_CONNS=1`` runs wrk at c=1 instead of
32 (the latency probe). A development probe: bench/accounting_bench.py is the benchmark of
record.

    python bench/accounting_breakdown.py ROUNDS DURATION plain master nolim lim full usage

A/B of two source trees: a variant written NAME@base runs with PYTHONPATH set to
$BENCH_BASE_SRC (say, the src/ folder of `git worktree add /tmp/base HEAD`), so the same
variant on the old and the new code share every round:

    BENCH_BASE_SRC=/tmp/base/src python bench/accounting_breakdown.py 5 4 full@base full
"""

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

REPO = Path(__file__).resolve().parents[1]
AB = REPO / "bench/.work/breakdown"
PY = sys.executable
MASTER = "sk-bench-master-accounting"
procs = []


def cleanup(*_):
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)


def start(argv, logname, env=None):
    AB.mkdir(parents=True, exist_ok=True)
    with (AB / logname).open("w") as log:
        p = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
    procs.append(p)
    return p


def wait_http(url, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"not ready: {url}")


def nginx():
    nd = AB / "nginx"
    shutil.rmtree(nd, ignore_errors=True)
    nd.mkdir()
    conf = (
        (REPO / "bench/nginx.conf")
        .read_text()
        .replace("@@WORKDIR@@", str(nd))
        .replace("@@PORT@@", "9100")
        .replace("@@CHAT_BODY@@", gb.nginx_quote(gb.chat_completion_body()))
        .replace("@@SSE_BODY@@", gb.nginx_quote(gb.sse_body()))
    )
    (nd / "nginx.conf").write_text(conf)
    start(["taskset", "-c", "1", "nginx", "-p", str(nd), "-c", str(nd / "nginx.conf")], "nginx.log")
    wait_http("http://127.0.0.1:9100/healthz")


_AUTH = "auth: {master_key: os.environ/BENCH_MASTER_KEY}\n"
_DB = "database_url: os.environ/BENCH_DATABASE_URL\nredis_url: redis://127.0.0.1:6379/0\n"
VARIANTS = {  # name: (key mode, settings added to the server/logging/models of the bench)
    "plain": ("none", "usage: {enabled: false}\n"),
    "master": ("master", _AUTH + "usage: {enabled: false}\n"),
    "nolim": ("nolimits", _AUTH + "usage: {enabled: false}\n"),
    "lim": ("limits", _AUTH + "usage: {enabled: false}\n"),
    "full": ("limits", _AUTH + "usage: {enabled: true}\n"),
    "usage": ("none", "usage: {enabled: true}\n"),
    "redis": ("limits", _AUTH + "usage: {enabled: true}\n" + _DB),
    # the two halves of redis: its limiter alone, and its PostgreSQL usage records alone
    "rlim": ("limits", _AUTH + "usage: {enabled: false}\n" + _DB),
    "pgusage": ("none", "usage: {enabled: true}\n" + _DB),
}


def write_configs():
    """One config per variant from bench/sluice-accounting-memory.yaml's models."""
    text = (REPO / "bench/sluice-accounting-memory.yaml").read_text()
    models = text[text.index("\nmodels:") + 1 :]
    head = (
        "server: {host: 127.0.0.1, port: 8080, max_body_bytes: 4194304}\n"
        "logging: {level: info, access_log: true}\n"
    )
    (AB / "cfg").mkdir(parents=True, exist_ok=True)
    for name, (mode, extra) in VARIANTS.items():
        (AB / "cfg" / f"{name}.yaml").write_text(f"# key: {mode}\n{head}{extra}{models}")


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    parts = s[s.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


KEY_SPEC = {"rpm": 100_000_000, "tpm": 2_000_000_000, "max_parallel": 100_000}


def server_setup(name, port, data_root):
    """Config, key mode, file-name slug and environment of the server for variant ``name``
    (NAME@base: on the source tree $BENCH_BASE_SRC), with a fresh data dir."""
    variant, _, tree = name.partition("@")
    cfg = AB / "cfg" / f"{variant}.yaml"
    found = re.search(r"# key: (\w+)", cfg.read_text())
    mode = found.group(1) if found else "none"
    slug = name.replace("@", "-")
    data = data_root / slug
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = {
        "BENCH_UPSTREAM_KEY": "sk-upstream",
        "BENCH_MASTER_KEY": MASTER,
        "SLUICE_DATA_DIR": str(data),
        "SLUICE_SERVER__PORT": str(port),
        "BENCH_DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", ""),
    }
    if tree:
        env["PYTHONPATH"] = os.environ["BENCH_BASE_SRC"]
    return cfg, mode, slug, env


def create_key(mode, port):
    """The credential a variant's requests carry: an unchecked stand-in (no auth), the master
    key, or a new virtual key (with limits that never refuse for mode "limits")."""
    if mode == "none":
        return gb.PLAIN_CLIENT_KEY
    if mode == "master":
        return MASTER
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/keys",
        data=json.dumps(KEY_SPEC if mode == "limits" else {}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(req).read())["key"]


def main():
    rounds, dur = int(sys.argv[1]), int(sys.argv[2])
    names = sys.argv[3:]
    write_configs()
    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))
    nginx()
    variants = []
    for i, name in enumerate(names):
        port = 8081 + i
        cfg, mode, slug, env = server_setup(name, port, AB / "data")
        p = start(
            ["taskset", "-c", "0", PY, "-m", "sluice", "serve", "--config", str(cfg)],
            f"{slug}.log",
            env,
        )
        wait_http(f"http://127.0.0.1:{port}/healthz")
        auth = create_key(mode, port)
        variants.append((name, port, auth, p))
    # warm-up
    for _name, port, auth, _proc in variants:
        run_wrk(port, auth, 2)
    res = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name, port, auth, p in order:
            c0 = cpu_of(p.pid)
            rps, n = run_wrk(port, auth, dur)
            c1 = cpu_of(p.pid)
            res[name].append(rps)
            cpu[name].append((c1 - c0) / max(n, 1) * 1e6)
        print(
            f"round {r}: " + "  ".join(f"{n}={res[n][-1]:.0f} ({cpu[n][-1]:.0f}us)" for n in names),
            flush=True,
        )
    base = names[0]
    print("\nvariant       median rps   median ratio   cpu us/req (median)")
    for n in names:
        ratios = [a / b for a, b in zip(res[n], res[base], strict=True)]
        print(
            f"{n:14s} {statistics.median(res[n]):9.0f}   {statistics.median(ratios):8.3f}"
            f"      {statistics.median(cpu[n]):6.1f}"
        )
    cleanup()


def run_wrk(port, auth, dur):
    env = dict(os.environ)
    env["BENCH_BODY"] = gb.REQUEST_BODY
    env["BENCH_AUTH"] = auth or ""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{os.environ.get('BENCH_CONNS', '32')}",
            "--latency",
            f"-d{dur}s",
            "-s",
            str(REPO / "bench/post.lua"),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = gb.wrk_percentiles(out)
    print(f"  port {port}: p50 {pct['50']:.3f} p99 {pct['99']:.3f} ms", flush=True)
    n = int(re.search(r"(\d+) requests in", out).group(1))
    if "Non-2xx" in out:
        raise SystemExit(f"non-2xx responses from port {port}:\n{out}")
    return rps, n


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
