#!/usr/bin/env python3
"""Accounting benchmark: the core gateway benchmark with auth, limits and usage on.

Measures, in one run and on the same nginx mock and CPU pinning as
bench/gateway_bench.py (whose functions it imports, unchanged):

    direct  -- wrk straight to the nginx mock (c=1 only: the latency baseline);
    plain   -- `sluice serve --config bench/sluice-bench.yaml` (no auth, usage off);
    memory  -- bench/sluice-accounting-memory.yaml: master key, a virtual key with
               RPM/TPM/parallel limits (MemoryLimiter), usage records in SQLite;
    redis   -- bench/sluice-accounting-redis.yaml: the same with limits in Redis
               (127.0.0.1:6379/0) and keys + usage in a fresh PostgreSQL database
               (created on 127.0.0.1:5432 and dropped at the end).

Sluice runs with 1 worker on core 0, JSON access log and metrics on; nginx and wrk
share core 1. For the two accounting variants the script creates a virtual key through
`POST /admin/keys` (limits so high they are checked and counted but never refuse) and
wrk sends it as `Authorization: Bearer` (bench/post.lua, BENCH_AUTH). plain is sent the
same requests with a stand-in key of the same length (gateway_bench.PLAIN_CLIENT_KEY),
which it ignores: an OpenAI client always sends one, and the ratio compares the same load.

Per Sluice variant: p50/p99 at c=1 (overhead vs direct), req/s at c=32 and c=64 and the
ratio to plain. After every measured run the script reads the requests Sluice answered
(/metrics) and the usage rows in the database, and waits for the rows to catch up: the
backlog at the end of the run and the time to drain it show whether the usage writer
keeps up. After stopping each variant (SIGTERM drains the writer) it checks rows ==
requests answered, also with `sluice usage`. With --profile, py-spy samples the Redis
variant under an extra c=32 run.

Before measuring it waits until no other benchmark runs (pgrep for engine_bench.py,
engine_raw.py, gateway_bench.py, wrk) and the 1-minute load is low, then uses
gateway_bench's per-run noise detection (disturbed runs are repeated). Redis and
PostgreSQL are part of the system under test in the Redis variant: their CPU is reported
separately there instead of being counted as disturbance.

Usage (repo root, sluice venv active):

    python bench/accounting_bench.py [--duration 10] [--profile] [--nice -10]
                                     [--write-docs] [--noise-budget 300]

Logs, rendered configs, raw JSON and profiles go to bench/.work/accounting/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

REPO = gb.REPO
BENCH = gb.BENCH
OUT = gb.WORK / "accounting"
DOCS = gb.DOCS
HOST = gb.HOST


MASTER_KEY = "sk-bench-master-accounting"
UPSTREAM_KEY = gb.UPSTREAM_KEY
# The brief asked for tpm 100,000,000,000; PostgreSQL stores tpm in an int4 column and
# POST /admin/keys answers 500 (asyncpg OverflowError) for it, so both variants use a TPM
# limit that fits int4 and is still ~250x what a minute of this benchmark reserves.
KEY_SPEC = {"rpm": 100_000_000, "tpm": 2_000_000_000, "max_parallel": 100_000}


PG_ADMIN_DB = "test"
PG_USER = "postgres"
PG_HOST = "127.0.0.1"
PG_PORT = 5432
REDIS_URL = "redis://127.0.0.1:6379/0"

# Targets from issue 4.
TARGET_RATIO_C32 = 0.85
TARGET_P50_OVERHEAD_REDIS_MS = 0.6

OTHER_BENCH_PATTERN = r"engine_bench\.py|engine_raw\.py|gateway_bench\.py|wrk "
SERVICE_COMMS = {"postgres", "redis-server"}


def log(msg: str) -> None:
    print(f"[acct {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Redis / PostgreSQL CPU: part of the system under test in the Redis variant
# --------------------------------------------------------------------------


class Services:
    """While `active`, postgres/redis-server CPU is not "foreign": it is kept apart."""

    active = False
    last_pct = 0.0
    last_top: list[str] = []


_orig_foreign_cpu = gb.foreign_cpu


def _foreign_cpu(
    before: dict[int, tuple[int, int, str]],
    after: dict[int, tuple[int, int, str]],
    ours: set[int],
    elapsed: float,
) -> tuple[float, list[str]]:
    if not Services.active:
        return _orig_foreign_cpu(before, after, ours, elapsed)
    svc = {p: v for p, v in after.items() if v[2] in SERVICE_COMMS}
    rest = {p: v for p, v in after.items() if v[2] not in SERVICE_COMMS}
    Services.last_pct, Services.last_top = _orig_foreign_cpu(before, svc, set(), elapsed)
    return _orig_foreign_cpu(before, rest, ours, elapsed)


def _service_threads() -> list[int]:
    """Thread ids of every redis-server and postgres process on the machine."""
    tids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in SERVICE_COMMS:
                continue
            tids += [int(t.name) for t in (proc / "task").iterdir()]
        except OSError:  # it exited meanwhile
            continue
    return tids


@contextlib.contextmanager
def services_on_core(core: int | None, nice: int) -> Any:
    """Pin the machine's Redis and PostgreSQL to ``core`` for the run (every thread; the
    postmaster too, so the backends it forks for Sluice's connections start there) at the
    nice value of the mock and load generator beside them, and give them back their cores
    and nice values afterwards. In production they run on other hosts: on two cores, left
    free to run on the gateway's core, their CPU would be charged to the gateway; left at
    nice 0 beside a wrk and an nginx at ``--nice -10``, the scheduler lets them wait behind
    those, and their replies' delay idles the gateway. Yields a note for the docs."""
    if core is None:
        yield "Redis and PostgreSQL not pinned (they may run on either core)"
        return
    saved: dict[int, tuple[set[int], int]] = {}
    for tid in _service_threads():
        with contextlib.suppress(OSError):
            saved[tid] = (os.sched_getaffinity(tid), os.getpriority(os.PRIO_PROCESS, tid))
            os.sched_setaffinity(tid, {core})
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    # Threads started meanwhile (backends forked by the pinned postmaster) get the cores
    # and nice value the services had.
    before = (
        (set().union(*(c for c, _ in saved.values())), max(n for _, n in saved.values()))
        if saved
        else (set(os.sched_getaffinity(0)), 0)
    )
    try:
        yield f"Redis and PostgreSQL pinned to core {core} at nice {nice} ({len(saved)} threads)"
    finally:
        for tid in _service_threads():
            cores, value = saved.get(tid, before)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)
                os.setpriority(os.PRIO_PROCESS, tid, value)


# gateway_bench's run_wrk / wait_quiet / wait_for_idle look this name up at call time.
gb.foreign_cpu = _foreign_cpu


def run_wrk(url: str, conns: int, duration: int, auth: str | None, latency: bool = True) -> Any:
    r = gb.run_wrk(url, conns, duration, gb.REQUEST_BODY, auth, latency)
    r.service_cpu_pct = Services.last_pct if Services.active else None
    r.service_top = list(Services.last_top) if Services.active else []
    return r


# --------------------------------------------------------------------------
# Waiting for other benchmarks
# --------------------------------------------------------------------------


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            break
    return pids


def other_benchmarks() -> list[str]:
    cp = subprocess.run(
        ["pgrep", "-af", OTHER_BENCH_PATTERN], capture_output=True, text=True, check=False
    )
    mine = _ancestors() | gb.our_pgids()
    out = []
    for line in cp.stdout.splitlines():
        pid = int(line.split()[0])
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if pid in mine or pgid in gb.our_pgids():
            continue
        out.append(line[:160])
    return out


def wait_for_other_benchmarks(args: argparse.Namespace) -> list[str]:
    """Wait until no other benchmark runs AND the 1-minute load is low (both at once).

    Other benchmarks come and go (a new one may start while the load decays), so pgrep
    is checked again on every round, and once more after the idle check.
    """
    notes: list[str] = []
    t0 = time.monotonic()
    last_said = -1e9
    seen: set[str] = set()
    while True:
        others = other_benchmarks()
        load = os.getloadavg()[0]
        if not others and load <= args.max_load:
            busy = gb.wait_for_idle(args.wait_idle)
            if not other_benchmarks():
                break
            continue
        seen.update(others)
        waited = time.monotonic() - t0
        if waited >= args.wait_others:
            notes.append(
                f"gave up waiting after {waited:.0f} s: "
                + ("; ".join(others) if others else f"1-minute load {load:.2f}")
            )
            log("warning: " + notes[-1])
            busy = gb.wait_for_idle(args.wait_idle)
            break
        if waited - last_said >= 60:
            log(
                f"waiting ({waited:.0f} s): "
                + ("; ".join(others) if others else f"1-minute load {load:.2f} > {args.max_load}")
            )
            last_said = waited
        time.sleep(5)
    waited = time.monotonic() - t0
    if waited > 5:
        notes.append(
            f"waited {waited:.0f} s before starting for other benchmarks to finish and the "
            f"1-minute load to drop below {args.max_load}"
            + (f" (seen: {'; '.join(sorted(seen))[:400]})" if seen else "")
        )
    la = os.getloadavg()
    notes.append(f"load average at start: {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1 / 5 / 15 min)")
    if busy:
        notes.append(busy + " (waited up to --wait-idle, then started)")
        log("warning: " + busy)
    return notes


# --------------------------------------------------------------------------
# Variants, database helpers
# --------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    label: str
    config: str  # repo-relative
    accounting: bool
    postgres: bool = False
    data_dir: str | None = None  # repo-relative, emptied before the run


VARIANTS = [
    Variant("plain", "plain (no auth, usage off)", "bench/sluice-bench.yaml", False),
    Variant(
        "memory",
        "auth + limits + usage, memory/SQLite",
        "bench/sluice-accounting-memory.yaml",
        True,
        data_dir="bench/.work/accounting/sqlite",
    ),
    Variant(
        "redis",
        "auth + limits + usage, Redis/PostgreSQL",
        "bench/sluice-accounting-redis.yaml",
        True,
        postgres=True,
        data_dir="bench/.work/accounting/pg-spool",
    ),
]


def psql(db: str, sql: str, timeout: float = 30) -> str:
    cp = subprocess.run(
        [
            "psql",
            "-h",
            PG_HOST,
            "-p",
            str(PG_PORT),
            "-U",
            PG_USER,
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if cp.returncode != 0:
        raise gb.BenchError(f"psql -d {db} -c {sql!r} failed: {cp.stderr.strip()}")
    return cp.stdout.strip()


class PgDatabase:
    def __init__(self, suffix: str = "") -> None:
        self.name = f"sluice_acct_bench_{os.getpid()}{suffix}"
        self.created = False

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    def create(self) -> None:
        psql(PG_ADMIN_DB, f"DROP DATABASE IF EXISTS {self.name}")
        psql(PG_ADMIN_DB, f"CREATE DATABASE {self.name}")
        self.created = True
        log(f"created PostgreSQL database {self.name}")

    def drop(self) -> None:
        if not self.created:
            return
        try:
            psql(PG_ADMIN_DB, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
            self.created = False
            log(f"dropped PostgreSQL database {self.name}")
        except (gb.BenchError, subprocess.TimeoutExpired) as e:
            log(f"warning: could not drop {self.name}: {e}")


def count_rows(v: Variant, pg: PgDatabase | None) -> int:
    if v.postgres:
        assert pg is not None
        return int(psql(pg.name, "SELECT count(*) FROM usage_records"))
    assert v.data_dir is not None
    path = REPO / v.data_dir / "sluice.db"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT count(*) FROM usage_records").fetchone()[0])
    finally:
        con.close()


def served_count(port: int) -> dict[str, int]:
    """Requests Sluice answered on /v1 routes (sluice_requests_total), by status."""
    status, _, data = gb.http("GET", f"http://{HOST}:{port}/metrics", timeout=10)
    if status != 200:
        raise gb.BenchError(f"GET /metrics -> HTTP {status}")
    by: Counter[str] = Counter()
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.startswith("sluice_requests_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        if 'route="models"' in labels:
            continue
        m = re.search(r'status="(\d+)"', labels)
        by[m.group(1) if m else "?"] += int(float(value))
    return dict(by)


def accepted(by_status: dict[str, int]) -> int:
    """The 200 responses: each must have a usage record.

    Every benchmark request should be a 200; refusals (401/403/429) get no record, and a
    request the client abandons before its body is read (answered 500) is not accepted
    either, so the count to match is the 200s. Other statuses are reported apart.
    """
    return by_status.get("200", 0)


def drain_check(v: Variant, pg: PgDatabase | None, port: int, timeout: float) -> dict[str, Any]:
    """Right after a run: backlog (answered - rows) and how long the writer takes to clear it."""
    t0 = time.monotonic()
    served = accepted(served_count(port))
    rows = count_rows(v, pg)
    backlog0 = served - rows
    while rows < served and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        served = accepted(served_count(port))
        rows = count_rows(v, pg)
    return {
        "served": served,
        "rows": rows,
        "backlog_at_end": backlog0,
        "drain_s": time.monotonic() - t0,
        "drained": rows >= served,
    }


# --------------------------------------------------------------------------
# Sluice
# --------------------------------------------------------------------------


def render_config(v: Variant, port: int) -> str:
    """The config to pass: the committed file, or a copy with the mock's port changed."""
    if gb.NGINX_PORT == gb.DEFAULT_NGINX_PORT:
        return v.config
    src = REPO / v.config
    dst = OUT / f"{src.stem}.port{gb.NGINX_PORT}{src.suffix}"
    dst.write_text(
        src.read_text().replace(f"{HOST}:{gb.DEFAULT_NGINX_PORT}", f"{HOST}:{gb.NGINX_PORT}")
    )
    return str(dst.relative_to(REPO))


def sluice_env(v: Variant, pg: PgDatabase | None) -> dict[str, str]:
    env = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
    if v.accounting:
        env["BENCH_MASTER_KEY"] = MASTER_KEY
    if v.postgres:
        assert pg is not None
        env["BENCH_DATABASE_URL"] = pg.url
    return env


def start_sluice(
    pm: gb.ProcessManager,
    v: Variant,
    pg: PgDatabase | None,
    port: int,
    commands: dict[str, str],
    phase: str = "",
) -> gb.Proc:
    exe = gb.venv_bin("sluice")
    if not exe:
        raise gb.BenchError("`sluice` executable not found; activate the repo's .venv")
    if v.data_dir:
        shutil.rmtree(REPO / v.data_dir, ignore_errors=True)
    args = ["serve", "--config", render_config(v, port), "--host", HOST, "--port", str(port)]
    args += ["--workers", "1"]
    extra = sluice_env(v, pg)
    env = dict(os.environ, **extra)
    for k in ("SLUICE_CONFIG", "DATABASE_URL"):
        env.pop(k, None)
    logp = OUT / f"sluice-{v.name}{phase}.log"
    proc = pm.start(
        f"sluice-{v.name}{phase}", [*gb.pin(gb.GATEWAY_CORE), exe, *args], logp, env=env
    )
    shown = dict(extra)
    if "BENCH_DATABASE_URL" in shown:
        shown["BENCH_DATABASE_URL"] = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/<fresh db>"
    commands[v.name + phase] = (
        " ".join(f"{k}={val}" for k, val in shown.items())
        + f" {shlex.join(gb.pin(gb.GATEWAY_CORE))} sluice {shlex.join(args)}"
        + f" > {logp.relative_to(REPO)} 2>&1"
    )
    return proc


def create_key(port: int) -> tuple[str, str]:
    status, _, data = gb.http(
        "POST",
        f"http://{HOST}:{port}/admin/keys",
        json.dumps(KEY_SPEC),
        {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    if status != 201:
        raise gb.BenchError(f"POST /admin/keys -> HTTP {status}: {data[:500]!r}")
    body = json.loads(data)
    return body["id"], body["key"]


def check_limited(port: int, key: str) -> str:
    """One request with the key: must be 200 and carry x-ratelimit-* headers."""
    status, hdrs, data = gb.http(
        "POST",
        f"http://{HOST}:{port}/v1/chat/completions",
        gb.REQUEST_BODY,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )
    if status != 200:
        raise gb.BenchError(f"request with the virtual key -> HTTP {status}: {data[:300]!r}")
    rl = {k: v for k, v in hdrs.items() if k.startswith("x-ratelimit-")}
    if "x-ratelimit-limit-requests" not in rl or "x-ratelimit-limit-tokens" not in rl:
        raise gb.BenchError(f"no x-ratelimit-* headers on a limited key's response: {hdrs}")
    # A request without a key must be refused: auth is really on.
    st2, _, _ = gb.http(
        "POST",
        f"http://{HOST}:{port}/v1/chat/completions",
        gb.REQUEST_BODY,
        {"Content-Type": "application/json"},
        timeout=30,
    )
    if st2 != 401:
        raise gb.BenchError(f"request without a key -> HTTP {st2}, expected 401")
    return ", ".join(f"{k}: {v}" for k, v in sorted(rl.items()))


def sluice_usage_cli(v: Variant, pg: PgDatabase | None, port: int) -> str:
    exe = gb.venv_bin("sluice") or "sluice"
    env = dict(os.environ, **sluice_env(v, pg))
    env.pop("SLUICE_CONFIG", None)
    cp = subprocess.run(
        [exe, "usage", "--config", render_config(v, port), "--group-by", "key,model"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    return (cp.stdout + cp.stderr).strip() + (
        "" if cp.returncode == 0 else f"\n(rc {cp.returncode})"
    )


def access_log_counts(path: Path) -> Counter[str]:
    statuses: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(path, "rb") as f:
        for ln in f:
            if b'"sluice.access"' not in ln:
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(ln)
                if str(obj.get("path", "")).startswith("/v1/chat"):
                    statuses[str(obj.get("status"))] += 1
    return statuses


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    label: str
    c1: Any = None
    c32: Any = None
    c64: Any = None
    discarded: list[Any] = field(default_factory=list)
    drains: dict[str, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    ready_s: float | None = None
    notes: list[str] = field(default_factory=list)
    usage_cli: str = ""

    def runs(self) -> list[Any]:
        return [r for r in (self.c1, self.c32, self.c64) if r is not None]

    @property
    def non2xx(self) -> int:
        return sum(r.non2xx for r in self.runs())

    @property
    def socket_errors(self) -> int:
        return sum(sum(r.socket_errors.values()) for r in self.runs())


def measure_series(
    res: Result,
    url: str,
    auth: str | None,
    args: argparse.Namespace,
    conns_list: tuple[int, ...],
    after_run: Any = None,
) -> None:
    for conns in conns_list:
        label = f"{res.name} c={conns}"
        log(f"{label}: {args.duration}s of wrk")

        def one(c: int = conns) -> Any:
            r = run_wrk(url, c, args.duration, auth)
            if after_run is not None:
                r.drain = after_run(c)
            return r

        best, done = gb.trials(label, args, one)
        setattr(res, f"c{conns}", best)
        res.discarded += [r for r in done if r is not best]
        if len(done) > 1:
            res.notes.append(
                f"wrk c={conns}: {len(done)} trials (foreign CPU "
                + ", ".join(f"{r.foreign_cpu_pct:.0f}%" for r in done)
                + f"), kept the one at {best.foreign_cpu_pct:.0f}%: "
                + ", ".join(f"{r.rps:,.0f}" for r in done)
                + " req/s"
            )
        if getattr(best, "drain", None) is not None:
            res.drains[f"c{conns}"] = best.drain
        if best.foreign_cpu_pct >= gb.FOREIGN_CPU_WARN_PCT:
            msg = (
                f"wrk c={conns}: other processes used {best.foreign_cpu_pct:.0f}% of a core "
                f"({', '.join(best.foreign_top)})"
            )
            res.notes.append("NOISY: " + msg)
            log("warning: " + msg)
    for r in [*res.runs(), *res.discarded]:
        if r.errors:
            kept = "" if any(r is x for x in res.runs()) else " (discarded trial)"
            res.notes.append(
                f"wrk c={r.conns}{kept}: {r.non2xx} non-2xx, socket errors {r.socket_errors}"
            )


def measure_variant(
    pm: gb.ProcessManager,
    v: Variant,
    args: argparse.Namespace,
    commands: dict[str, str],
    pg: PgDatabase | None,
) -> tuple[Result, dict[str, Any] | None]:
    port = args.sluice_port
    res = Result(v.name, v.label)
    profile = None
    Services.active = v.postgres
    if v.postgres:
        assert pg is not None
        pg.create()
    proc = start_sluice(pm, v, pg, port, commands)
    try:
        res.ready_s = gb.wait_ready(proc, f"http://{HOST}:{port}/readyz", args.ready_timeout)
        url = f"http://{HOST}:{port}/v1/chat/completions"
        key: str | None = gb.PLAIN_CLIENT_KEY  # the same requests, ignored without auth
        key_id = None
        if v.accounting:
            key_id, key = create_key(port)
            res.notes.append(
                f"virtual key {key_id} created through POST /admin/keys {json.dumps(KEY_SPEC)}"
            )
            res.notes.append("response headers: " + check_limited(port, key))
        t = gb.Target(v.name, url, url, key, proc, res.ready_s)
        res.notes += gb.sanity_check(t)
        log(f"{v.name}: warm-up {args.warmup}s at c=8")
        run_wrk(url, 8, args.warmup, key, latency=False)

        after = None
        if v.accounting:
            drain_check(v, pg, port, args.drain_timeout)  # settle the warm-up

            def after(c: int) -> dict[str, Any]:
                d = drain_check(v, pg, port, args.drain_timeout)
                log(
                    f"{v.name} c={c}: usage backlog at end of run {d['backlog_at_end']:,} rows, "
                    f"drained in {d['drain_s']:.2f} s (rows {d['rows']:,} / 200 responses "
                    f"{d['served']:,})"
                )
                return d

        measure_series(res, url, key, args, (1, 32, 64), after)
        if args.profile and v.name == args.profile_variant:
            try:
                profile = gb.profile_sluice(t, args.duration)
                if profile.get("error"):
                    res.notes.append(profile["error"])
            except Exception as e:  # best effort
                res.notes.append(f"profiling failed: {e}")
        served = served_count(port)
        if v.accounting:
            res.final["answered_before_stop"] = served
            res.final["pre_stop"] = drain_check(v, pg, port, args.drain_timeout)
        # Metrics on: one scrape must answer (the access log is counted below).
        st, _, _ = gb.http("GET", f"http://{HOST}:{port}/metrics", timeout=10)
        res.notes.append(f"GET /metrics: {st}")
    finally:
        pm.stop(proc)
        Services.active = False
    access = access_log_counts(proc.log_path)
    res.final["access_log_chat"] = dict(access)
    res.notes.append(
        f"log {proc.log_path.relative_to(REPO)}: access-log lines for /v1/chat/completions by "
        "status: " + (", ".join(f"{k}: {n:,}" for k, n in sorted(access.items())) or "none")
    )
    if v.accounting:
        try:
            rows = count_rows(v, pg)
        except Exception as e:
            rows = -1
            res.notes.append(f"counting usage rows after stop failed: {e}")
        total_served = accepted(res.final["answered_before_stop"])
        wrk_total = sum(r.requests for r in [*res.runs(), *res.discarded])
        res.final.update(rows_after_stop=rows, answered=total_served, wrk_requests=wrk_total)
        spools = (REPO / (v.data_dir or "")).glob("usage-spool*.jsonl")
        res.final["spool_exists"] = any(spools)
        res.usage_cli = sluice_usage_cli(v, pg, port)
        log(
            f"{v.name}: usage rows after stop {rows:,}, 200 responses {total_served:,} "
            f"(wrk counted {wrk_total:,} in measured runs)"
        )
    if v.postgres and pg is not None:
        pg.drop()
        if key_id:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["redis-cli", "-u", REDIS_URL, "DEL"]
                    + [f"sluice:rl:key:{key_id}:{s}" for s in "rtp"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
    return res, profile


@dataclass
class Interleaved:
    """c=32 throughput measured in alternating rounds, every variant's server running."""

    rounds: int
    duration: int
    rps: dict[str, list[float]] = field(default_factory=dict)
    foreign: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    def median(self, name: str) -> float:
        return statistics.median(self.rps[name])

    def ratio(self, name: str) -> float:
        """Median over rounds of (variant / plain in the same round)."""
        return statistics.median(
            v / p for v, p in zip(self.rps[name], self.rps["plain"], strict=True)
        )


@dataclass
class Paired:
    """Rounds in which plain and one accounting variant are loaded at the same time, each
    by its own wrk (core 1), both servers on core 0: the scheduler gives each about half
    the core, under the same machine speed at every instant. Per round and concurrency:
    (variant req/s, plain req/s, variant CPU s, plain CPU s)."""

    rounds: int
    duration: int
    conns: tuple[int, ...]
    runs: dict[tuple[str, int], list[tuple[float, float, float, float]]] = field(
        default_factory=dict
    )
    errors: int = 0

    def ratio(self, name: str, conns: int) -> float:
        """Median over rounds of (variant req/s / plain req/s in the same round)."""
        return statistics.median(v / p for v, p, _, _ in self.runs[(name, conns)])

    def cpu_ratio(self, name: str, conns: int) -> float:
        """Median over rounds of (variant requests per CPU second / plain's)."""
        return statistics.median(
            (v / vc) / (p / pc) for v, p, vc, pc in self.runs[(name, conns)] if vc and pc
        )

    def share(self, name: str, conns: int) -> float:
        """Median share of core 0's busy time that went to the variant."""
        return statistics.median(vc / (vc + pc) for _, _, vc, pc in self.runs[(name, conns)])

    def spread(self, name: str, conns: int) -> tuple[float, float]:
        ratios = [v / p for v, p, _, _ in self.runs[(name, conns)]]
        return min(ratios), max(ratios)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_paired(
    args: argparse.Namespace,
    names: list[str],
    ports: dict[str, int],
    keys: dict[str, str | None],
    procs: dict[str, gb.Proc],
) -> Paired:
    """See `Paired`. A sequential round compares variants measured seconds apart, and this
    machine's speed moves by tens of percent from one second to the next; two servers
    sharing core 0 are measured over the same milliseconds. What it measures is the ratio
    of what each gets done with the same share of the core (a variant that idles, waiting
    on Redis, leaves its share to plain: the req/s ratio counts that, the per-CPU ratio
    does not)."""
    result = Paired(args.paired_rounds, args.round_duration, (32, 64))
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        for r in range(args.paired_rounds):
            for conns in result.conns:
                for name in names:
                    if name == "plain":
                        continue
                    pair = ("plain", name) if r % 2 == 0 else (name, "plain")
                    Services.active = next(x for x in VARIANTS if x.name == name).postgres
                    before = {n: process_cpu_seconds(procs[n].popen.pid) for n in pair}
                    runs = [
                        pool.submit(
                            run_wrk,
                            f"http://{HOST}:{ports[n]}/v1/chat/completions",
                            conns,
                            args.round_duration,
                            keys[n],
                            False,
                        )
                        for n in pair
                    ]
                    got = dict(zip(pair, (run.result() for run in runs), strict=True))
                    cpu = {n: process_cpu_seconds(procs[n].popen.pid) - before[n] for n in pair}
                    Services.active = False
                    result.errors += sum(w.errors for w in got.values())
                    result.runs.setdefault((name, conns), []).append(
                        (got[name].rps, got["plain"].rps, cpu[name], cpu["plain"])
                    )
                    log(
                        f"paired round {r + 1}/{args.paired_rounds}, c={conns}: plain "
                        f"{got['plain'].rps:,.0f} req/s ({cpu['plain']:.2f} s CPU), {name} "
                        f"{got[name].rps:,.0f} ({cpu[name]:.2f} s): "
                        f"{100 * got[name].rps / got['plain'].rps:.1f}%"
                    )
    finally:
        Services.active = False
        pool.shutdown()
    return result


def measure_interleaved(
    pm: gb.ProcessManager, args: argparse.Namespace, commands: dict[str, str]
) -> tuple[Interleaved, Paired | None]:
    """This machine's speed drifts by tens of percent within minutes (other tenants of the
    host); variants measured one after another then differ by when they ran. Here every
    variant's server runs at once (on its own port, all pinned to the gateway core, idle
    but for the one under load) and c=32 runs alternate between them, round after round
    in a rotating order, so each round compares the variants under the same conditions."""
    names = [v.name for v in VARIANTS if v.name in args.variant_names]
    ports = {name: args.sluice_port + 1 + i for i, name in enumerate(names)}
    gb.require_ports({f"sluice ({n}, interleaved)": port for n, port in ports.items()})
    pg = PgDatabase(suffix="_interleaved") if "redis" in names else None
    procs: dict[str, gb.Proc] = {}
    keys: dict[str, str | None] = {}
    result = Interleaved(args.rounds, args.round_duration)
    paired: Paired | None = None
    try:
        if pg is not None:
            pg.create()
        for v in VARIANTS:
            if v.name in names:
                procs[v.name] = start_sluice(
                    pm, v, pg if v.postgres else None, ports[v.name], commands, "-interleaved"
                )
        for v in VARIANTS:
            if v.name not in names:
                continue
            port = ports[v.name]
            gb.wait_ready(procs[v.name], f"http://{HOST}:{port}/readyz", args.ready_timeout)
            keys[v.name] = create_key(port)[1] if v.accounting else gb.PLAIN_CLIENT_KEY
            run_wrk(f"http://{HOST}:{port}/v1/chat/completions", 8, args.warmup, keys[v.name])
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                v = next(x for x in VARIANTS if x.name == name)
                Services.active = v.postgres
                url = f"http://{HOST}:{ports[name]}/v1/chat/completions"
                w = run_wrk(url, 32, args.round_duration, keys[name], latency=False)
                Services.active = False
                result.rps.setdefault(name, []).append(w.rps)
                result.foreign.setdefault(name, []).append(w.foreign_cpu_pct)
                result.errors += w.errors
            log(
                f"interleaved round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {result.rps[n][-1]:,.0f}" for n in names)
                + " req/s"
            )
        if args.paired_rounds > 0 and "plain" in names and len(names) > 1:
            paired = measure_paired(args, names, ports, keys, procs)
    finally:
        Services.active = False
        for proc in procs.values():
            pm.stop(proc)
        if pg is not None:
            pg.drop()
    return result, paired


# --------------------------------------------------------------------------
# Profile summary (grouping the folded stacks by what the request path is doing)
# --------------------------------------------------------------------------

BUCKETS = [
    (
        "auth (key lookup, hashing, cache)",
        ("sluice/pipeline/auth.py", "sluice/pipeline/apikeys.py", "sluice/store/keys.py"),
    ),
    ("limits (guard + limiter)", ("sluice/pipeline/guard.py", "sluice/pipeline/limits/")),
    (
        "usage accounting (finish, recorder, insert)",
        ("sluice/pipeline/accounting.py", "sluice/store/recorder.py", "sluice/store/usage.py"),
    ),
    (
        "redis wire protocol (limits/wire.py, redis-py)",
        ("sluice/pipeline/limits/wire.py", "redis/", "hiredis"),
    ),
    ("upstream HTTP client (sluice/backends)", ("sluice/backends/",)),
    ("access log + metrics", ("sluice/observability/", "prometheus_client/")),
    ("sqlalchemy / asyncpg / aiosqlite", ("sqlalchemy/", "asyncpg/", "aiosqlite/")),
]


def profile_buckets(folded: Path) -> list[tuple[str, int, float]]:
    """Inclusive samples per bucket (a stack counts for a bucket if any frame matches)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        n = int(cnt)
        total += n
        frames = stack.split(";")
        for name, pats in BUCKETS:
            if any(p in f for f in frames for p in pats):
                counts[name] += n
    if not total:
        return []
    return [(name, counts[name], 100.0 * counts[name] / total) for name, _ in BUCKETS]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def p(r: Any, q: str) -> float | None:
    return r.percentiles_ms.get(q) if r is not None else None


def f3(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.3f}"


def build_tables(
    direct: Any,
    results: dict[str, Result],
    inter: Interleaved | None = None,
    paired: Paired | None = None,
) -> tuple[str, str, dict[str, Any]]:
    d50 = p(direct, "50")
    d99 = p(direct, "99")
    plain = results.get("plain")
    names = [n for n in ("plain", "memory", "redis") if n in results]
    head = "| Metric | direct (nginx) | " + " | ".join(results[n].label for n in names) + " |"
    lines = [head, "|---|" + "---:|" * (len(names) + 1)]

    def row(label: str, dcell: str, fn: Any) -> None:
        lines.append(f"| {label} | {dcell} | " + " | ".join(fn(results[n]) for n in names) + " |")

    row("p50 latency, c=1 (ms)", f3(d50), lambda r: f3(p(r.c1, "50")))
    row(
        "p50 overhead vs direct, c=1 (ms)",
        "",
        lambda r: f"{p(r.c1, '50') - d50:+.3f}" if d50 is not None and r.c1 else "—",
    )
    row("p99 latency, c=1 (ms)", f3(d99), lambda r: f3(p(r.c1, "99")))
    row(
        "p99 overhead vs direct, c=1 (ms)",
        "",
        lambda r: f"{p(r.c1, '99') - d99:+.3f}" if d99 is not None and r.c1 else "—",
    )
    row("req/s, c=32", "", lambda r: f"{r.c32.rps:,.0f}" if r.c32 else "—")
    row(
        "req/s c=32, % of plain",
        "",
        lambda r: f"{100 * r.c32.rps / plain.c32.rps:.1f}%" if plain and r.c32 else "—",
    )
    if inter is not None and inter.rps:
        row(
            f"req/s c=32, interleaved: median of {inter.rounds} rounds of {inter.duration} s",
            "",
            lambda r: f"{inter.median(r.name):,.0f}" if r.name in inter.rps else "—",
        )
        row(
            "req/s c=32, interleaved: % of plain (median of per-round ratios)",
            "",
            lambda r: f"{100 * inter.ratio(r.name):.1f}%" if r.name in inter.rps else "—",
        )
        row(
            "req/s c=32, interleaved: every round",
            "",
            lambda r: ", ".join(f"{x:,.0f}" for x in inter.rps.get(r.name, [])) or "—",
        )
    if paired is not None and paired.runs:
        for conns in paired.conns:

            def pcell(r: Result, fn: Any, conns: int = conns) -> str:
                if r.name == "plain":
                    return "100.0%"
                return fn(r.name, conns) if (r.name, conns) in paired.runs else "—"

            row(
                f"req/s c={conns}, paired with plain on one core: % of plain (median of "
                f"{paired.rounds} rounds of {paired.duration} s)",
                "",
                lambda r, c=conns: pcell(r, lambda n, c: f"{100 * paired.ratio(n, c):.1f}%", c),
            )
            row(
                f"req/s c={conns}, paired: lowest / highest round",
                "",
                lambda r, c=conns: pcell(
                    r,
                    lambda n, c: " / ".join(f"{100 * x:.1f}%" for x in paired.spread(n, c)),
                    c,
                ),
            )
            row(
                f"requests per CPU second c={conns}, paired: % of plain; variant's share of core 0",
                "",
                lambda r, c=conns: pcell(
                    r,
                    lambda n, c: (
                        f"{100 * paired.cpu_ratio(n, c):.1f}%; {100 * paired.share(n, c):.1f}%"
                    ),
                    c,
                ),
            )
    row("req/s, c=64", "", lambda r: f"{r.c64.rps:,.0f}" if r.c64 else "—")
    row(
        "req/s c=64, % of plain",
        "",
        lambda r: f"{100 * r.c64.rps / plain.c64.rps:.1f}%" if plain and r.c64 else "—",
    )
    row(
        "p50 / p99 latency, c=32 (ms)",
        "",
        lambda r: f"{f3(p(r.c32, '50'))} / {f3(p(r.c32, '99'))}",
    )
    row(
        "wrk requests c=1 / c=32 / c=64",
        f"{direct.requests:,} / — / —" if direct else "—",
        lambda r: " / ".join(f"{x.requests:,}" for x in r.runs()),
    )
    row(
        "errors: wrk non-2xx / socket errors",
        f"{direct.non2xx} / {sum(direct.socket_errors.values())}" if direct else "—",
        lambda r: f"{r.non2xx} / {r.socket_errors}",
    )

    def backlog(r: Result) -> str:
        if not r.drains:
            return "usage off"
        return " / ".join(
            f"{d['backlog_at_end']:,} ({d['drain_s']:.1f} s)"
            for d in (r.drains.get(k) for k in ("c1", "c32", "c64"))
            if d
        )

    row("usage backlog at end of run c=1 / c=32 / c=64 (rows; time to drain)", "", backlog)

    def rows(r: Result) -> str:
        if not r.final.get("answered"):
            return "usage off"
        ok = r.final["rows_after_stop"] == r.final["answered"]
        return f"{r.final['rows_after_stop']:,} / {r.final['answered']:,}" + (
            " (equal)" if ok else " (DIFFERENT)"
        )

    row("usage rows / 200 responses (whole variant, after stop)", "", rows)
    row(
        "CPU busy during c=32, core 0 / core 1",
        "",
        lambda r: " / ".join(f"{c:.0f}%" for c in r.c32.cpu_pct[:2]) if r.c32 else "—",
    )
    row(
        "Redis + PostgreSQL CPU during c=32 (% of a core)",
        "",
        lambda r: (
            f"{r.c32.service_cpu_pct:.0f}%"
            if r.c32 is not None and getattr(r.c32, "service_cpu_pct", None) is not None
            else "—"
        ),
    )
    table = "\n".join(lines)

    summary: dict[str, Any] = {}
    trows = ["| Target | Goal | Measured | Status |", "|---|---|---|---|"]

    def ratio_target(n: str, lab: str, key: str, ratio: float, detail: str) -> None:
        ok = ratio >= TARGET_RATIO_C32
        summary[f"{n}_{key}"] = ratio
        summary[f"{n}_ratio_c32_met"] = ok
        trows.append(
            f"| {lab} | ≥ {100 * TARGET_RATIO_C32:.0f}% | {100 * ratio:.1f}% ({detail}) | "
            f"{'met' if ok else 'missed'} |"
        )

    for n, lab in (("memory", "memory/SQLite"), ("redis", "Redis/PostgreSQL")):
        r = results.get(n)
        if paired is not None and (n, 32) in paired.runs:
            low, high = paired.spread(n, 32)
            ratio_target(
                n,
                f"{lab}: req/s at c=32 vs plain (paired rounds)",
                "ratio_c32_paired",
                paired.ratio(n, 32),
                f"rounds {100 * low:.1f}-{100 * high:.1f}%",
            )
        if inter is not None and n in inter.rps and "plain" in inter.rps:
            ratio_target(
                n,
                f"{lab}: req/s at c=32 vs plain (interleaved rounds)",
                "ratio_c32_interleaved",
                inter.ratio(n),
                f"medians {inter.median(n):,.0f} / {inter.median('plain'):,.0f}",
            )
        elif r is None or not r.c32 or not plain or not plain.c32:
            trows.append(f"| {lab}: req/s at c=32 vs plain | ≥ 85% | not measured | not measured |")
        else:
            ratio_target(
                n,
                f"{lab}: req/s at c=32 vs plain",
                "ratio_c32",
                r.c32.rps / plain.c32.rps,
                f"{r.c32.rps:,.0f} / {plain.c32.rps:,.0f}",
            )
    r = results.get("redis")
    if r is not None and r.c1 is not None and d50 is not None:
        ov = p(r.c1, "50") - d50
        ok = ov <= TARGET_P50_OVERHEAD_REDIS_MS
        summary["redis_p50_overhead_ms"] = ov
        summary["redis_p50_overhead_met"] = ok
        trows.append(
            f"| Redis/PostgreSQL: p50 overhead vs direct, c=1 | ≤ "
            f"{TARGET_P50_OVERHEAD_REDIS_MS} ms | {ov:.3f} ms ({p(r.c1, '50'):.3f} - "
            f"{d50:.3f}) | {'met' if ok else 'missed'} |"
        )
    else:
        trows.append(
            "| Redis/PostgreSQL: p50 overhead vs direct, c=1 | ≤ 0.6 ms | not measured "
            "| not measured |"
        )
    return table, "\n".join(trows), summary


def noise_summary(direct: Any, results: dict[str, Result]) -> list[str]:
    runs = [direct, *(x for r in results.values() for x in r.runs())]
    runs = [x for x in runs if x is not None]
    noisy = [x for x in runs if x.foreign_cpu_pct >= gb.FOREIGN_CPU_WARN_PCT]
    if not noisy:
        worst = max((x.foreign_cpu_pct for x in runs), default=0.0)
        return [
            f"All {len(runs)} measured runs were undisturbed by other processes "
            f"(at most {worst:.1f}% of a core outside the benchmark).",
            "",
        ]
    return [
        f"**Caution: {len(noisy)} of {len(runs)} measured runs were disturbed by other processes "
        f"(up to {max(x.foreign_cpu_pct for x in noisy):.0f}% of a core; see the notes): "
        "treat the figures as approximate.**",
        "",
    ]


def _round_commands(args: argparse.Namespace) -> list[str]:
    """The wrk runs of the interleaved and paired rounds, against the servers on the ports
    after --sluice-port (plain, memory, redis in VARIANTS order)."""
    wrk = (
        f"BENCH_BODY='<request JSON>' BENCH_AUTH=<its key> {shlex.join(gb.pin(gb.AUX_CORE))} "
        f"wrk -t1 -c{{c}} -d{args.round_duration}s --timeout 10s -s bench/post.lua "
        f"http://{HOST}:{{port}}/v1/chat/completions"
    )
    ports = [args.sluice_port + 1 + i for i in range(len(VARIANTS))]
    out = []
    if args.rounds > 0:
        out += [
            f"# interleaved rounds ({args.rounds}): one at a time, port in rotating order",
            wrk.format(c=32, port="{" + ",".join(map(str, ports)) + "}"),
        ]
    if args.paired_rounds > 0:
        out += [
            f"# paired rounds ({args.paired_rounds}, c=32 then c=64): plain's and a variant's "
            "wrk at once",
            wrk.format(c="{32,64}", port=ports[0])
            + " & "
            + wrk.format(c="{32,64}", port="{" + ",".join(map(str, ports[1:])) + "}")
            + "; wait",
        ]
    return out


def render_section(
    direct: Any,
    results: dict[str, Result],
    profile: dict[str, Any] | None,
    buckets: list[tuple[str, int, float]],
    facts: dict[str, str],
    vers: dict[str, str],
    commands: dict[str, str],
    args: argparse.Namespace,
    runtime_s: float,
    inter: Interleaved | None = None,
    paired: Paired | None = None,
) -> str:
    table, targets, _ = build_tables(direct, results, inter, paired)
    today = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmdline = (
        f"python bench/accounting_bench.py --duration {args.duration}"
        + (" --profile" if args.profile else "")
        + (f" --nice {args.nice}" if args.nice else "")
        + (f" --noise-budget {args.noise_budget:g}" if args.noise_budget != 180.0 else "")
        + (f" --rounds {args.rounds}" if args.rounds != 7 else "")
        + (f" --round-duration {args.round_duration}" if args.round_duration != 5 else "")
        + (f" --paired-rounds {args.paired_rounds}" if args.paired_rounds != 7 else "")
        + " --write-docs"
    )
    wrk_c = (
        f"BENCH_BODY='<request JSON>' BENCH_AUTH=<virtual key; plain: an unchecked stand-in> "
        f"{shlex.join(gb.pin(gb.AUX_CORE))} wrk -t1 -c{{1,32,64}} -d{args.duration}s "
        f"--timeout 10s -s bench/post.lua --latency URL"
    )
    out = [
        "## Auth, limits and usage accounting",
        "",
        "The core gateway benchmark with Sluice's accounting on: a virtual key checked on every "
        "request, its RPM/TPM/parallel limits counted, one usage record written per request. "
        "Generated by `bench/accounting_bench.py` "
        f"(last run {today}, `--duration {args.duration}`, total script runtime "
        f"{runtime_s:.0f} s), which reuses `bench/gateway_bench.py`'s mock, pinning, wrk "
        "driver and noise detection. Overhead = Sluice - direct.",
        "",
        "### Machine",
        "",
        f"- `nproc`: {facts['nproc']}; CPU: {facts['cpu']}; memory {facts['memory']}",
        f"- OS: {facts['os']}, kernel {facts['kernel']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        *(f"- {n}" for n in args.machine_notes),
        "",
        "### Setup",
        "",
        "- Mock upstream, pinning and load as in the core gateway section: nginx (fixed "
        f"`chat.completion` body) on 127.0.0.1:{gb.NGINX_PORT} and wrk (1 thread) share core "
        f"{gb.AUX_CORE}; Sluice (1 worker, JSON access log to a file, metrics on) has core "
        f"{gb.GATEWAY_CORE}. Redis and PostgreSQL are the machine's own services: "
        f"{getattr(args, 'services_note', 'not pinned')} — in production they run on other "
        "hosts, and left free to run on the gateway's core their CPU is charged to the gateway "
        "(until 2026-12-02 they were not pinned; their CPU is shown in the table and not "
        "counted as disturbance).",
        "- Variants, one after the other in one run, each a fresh `sluice serve`:",
        "  - **plain**: `bench/sluice-bench.yaml` as it is (no auth, `usage.enabled: false`) — "
        "the baseline; it is sent the same requests, `Authorization: Bearer` with a stand-in "
        "key of a virtual key's length included (OpenAI's SDKs always send one; without auth "
        "Sluice ignores it; until 2026-12-02 plain's requests carried no such header);",
        "  - **memory/SQLite**: `bench/sluice-accounting-memory.yaml`: `auth.master_key` from "
        "`BENCH_MASTER_KEY`, `usage: {enabled: true}` (defaults: batches of 500, flushed every "
        "0.5 s) in SQLite under a fresh `data_dir` (bench/.work/accounting/sqlite), no "
        "`redis_url` (in-process MemoryLimiter), model pricing set so costs and key spend are "
        "computed;",
        "  - **Redis/PostgreSQL**: `bench/sluice-accounting-redis.yaml`: the same with "
        f"`redis_url: {REDIS_URL}` (one Lua call per request to admit; the settles of one "
        "event-loop turn share one call) and "
        "`database_url` a fresh PostgreSQL 15 database on 127.0.0.1:5432, created before and "
        "dropped after the variant.",
        f"- For both accounting variants the script creates a virtual key with `POST /admin/keys` "
        f"(master key) and body `{json.dumps(KEY_SPEC)}`, so every request is authenticated, "
        "admitted against the key's RPM, TPM and parallel limits (and reconciled with the real "
        "token usage after it ends) but never refused; wrk sends it as `Authorization: Bearer`. "
        "The script checks that a request with the key carries the `x-ratelimit-*` headers and "
        "that one without a key gets 401.",
        f"- Each variant: sanity requests, {args.warmup} s of wrk at c=8, then wrk at c=1 "
        f"(`--latency`), c=32 and c=64 for {args.duration} s each. The direct (nginx) c=1 run is "
        "the latency baseline.",
        *(
            [
                f"- Interleaved throughput (the target's figure): this machine's speed drifts by "
                "tens of percent within minutes (other tenants of its host; the plain gateway "
                "alone measured anywhere from 4,600 to 7,000 req/s in one hour), so variants "
                "measured one after the other differ by when they ran. After the runs above, "
                "the script starts every variant's server at once (ports "
                f"{args.sluice_port + 1}-{args.sluice_port + len(inter.rps)}, all on core "
                f"{gb.GATEWAY_CORE}, idle but for the one under load, a fresh SQLite directory "
                "and PostgreSQL database), warms each up, then runs wrk c=32 for "
                f"{inter.duration} s on each in turn, {inter.rounds} rounds in rotating order. "
                "Each round gives a ratio to plain."
            ]
            if inter is not None and inter.rps
            else []
        ),
        *(
            [
                f"- Paired throughput (the target's figure): then {paired.rounds} rounds in "
                "which plain and one accounting variant are loaded *at the same time*, each by "
                f"its own wrk (1 thread, core {gb.AUX_CORE}) for {paired.duration} s, at c=32 "
                "and at c=64; which wrk starts first alternates. Both servers share core "
                f"{gb.GATEWAY_CORE}, so the scheduler gives each about half of it and both run "
                "at the same machine speed at every instant: the ratio of their req/s is the "
                "ratio of what each gets done with the same CPU (sequential rounds compare "
                "runs seconds apart, and this machine's speed moves by tens of percent from one "
                "second to the next). The servers' CPU time (utime + stime, /proc) gives the "
                "variant's share of the core and its requests per CPU second: a variant that "
                "idles (waiting on Redis) leaves its share to plain, which the req/s ratio "
                "counts and the per-CPU ratio does not. The target is judged on the median "
                "req/s ratio at c=32."
            ]
            if paired is not None and paired.runs
            else []
        ),
        "- Usage writer: after each measured run the script reads the requests Sluice answered "
        "(`sluice_requests_total` on /metrics) and counts `usage_records` rows (SQL), then polls "
        "until the rows catch up. The backlog at the end of a run is what the writer still held "
        "in memory; it stays bounded (about one flush interval of traffic) if the writer keeps "
        "up. After SIGTERM (the writer drains) the rows are counted again and compared with "
        "every 200 response of the whole variant (sanity, warm-up, measured runs, "
        "profile runs; the one deliberate 401 gets no record).",
        f"- Shared machine: before starting, the script waits until no other benchmark runs "
        f'(`pgrep -f "{OTHER_BENCH_PATTERN.replace(chr(92), "")}"`) and the 1-minute load is '
        f"below {args.max_load}; then, as gateway_bench.py does, every measured run is accounted "
        f"for CPU used by outside processes, and a run disturbed by ≥ "
        f"{gb.FOREIGN_CPU_WARN_PCT:.0f}% of a core is repeated (up to {args.repeat} trials, "
        f"{args.noise_budget:.0f} s of waiting/repeating in all), keeping the least disturbed."
        + (f" All benchmark processes ran at `nice -n {args.nice}`." if args.nice else ""),
        "",
        "### Commands",
        "",
        "```sh",
        cmdline,
        "# what it runs:",
        *commands.values(),
        wrk_c,
        f"# URL = http://{HOST}:{gb.NGINX_PORT}/v1/chat/completions (direct, c=1 only), "
        f"http://{HOST}:{args.sluice_port}/v1/chat/completions (Sluice)",
        *_round_commands(args),
        "```",
        "",
        "### Results",
        "",
        *noise_summary(direct, results),
        table,
        "",
        "### Targets",
        "",
        targets,
        "",
    ]
    notes = []
    for name, r in results.items():
        if r.ready_s is not None:
            notes.append(f"- {name}: ready after {r.ready_s:.1f} s")
        notes += [f"- {name}: {n}" for n in r.notes]
        if r.final.get("answered"):
            notes.append(
                f"- {name}: usage rows after stop {r.final['rows_after_stop']:,}; requests "
                f"answered 200 {r.final['answered']:,} (all answers by status: "
                f"{r.final['answered_before_stop']}); wrk counted {r.final['wrk_requests']:,} in "
                "its measured runs (plus warm-up, sanity and profile requests); usage spool file "
                + (
                    "present (database refused writes at shutdown)"
                    if r.final["spool_exists"]
                    else "absent"
                )
            )
    if notes:
        out += ["### Notes", "", *notes, ""]
    if profile and profile.get("own"):
        out += [
            f"### Profile: {args.profile_variant} variant under c=32 (py-spy)",
            "",
            "`py-spy record --function --gil --rate 500 --subprocesses` on the Sluice process "
            f"during a separate {args.duration} s c=32 run (not a measured one; "
            f"{profile['samples']} samples of the thread holding the GIL; flamegraph at "
            f"`{profile['svg']}`, not committed; the run under py-spy made "
            f"{profile.get('rps_raw', 0):,.0f} req/s). Time in C code is charged to the Python "
            "function calling it. Top functions by own time:",
            "",
            "| # | Function (file) | own samples | % |",
            "|---:|---|---:|---:|",
        ]
        for i, (fn, c, pc) in enumerate(profile["own"][:12], 1):
            out.append(f"| {i} | `{fn}` | {c} | {pc:.1f}% |")
        out += ["", "Own time by package:", "", "| Package | own samples | % |", "|---|---:|---:|"]
        for fn, c, pc in profile["packages"]:
            out.append(f"| `{fn}` | {c} | {pc:.1f}% |")
        if buckets:
            out += [
                "",
                "Inclusive time of the accounting work (a sample counts when any frame of its "
                "stack is in these files; the rows overlap, e.g. the redis client runs inside "
                "the limiter):",
                "",
                "| Part | samples | % of all |",
                "|---|---:|---:|",
            ]
            for name, c, pc in buckets:
                out.append(f"| {name} | {c} | {pc:.1f}% |")
        out.append("")
    return "\n".join(out)


def write_docs(section: str) -> None:
    gb.write_section("accounting", section)


def wrk_json(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    d = {k: v for k, v in x.__dict__.items() if k != "raw"}
    return d


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of c=8 warm-up per variant")
    ap.add_argument("--variants", default="plain,memory,redis", help="comma-separated subset")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the accounting section")
    ap.add_argument("--profile", action="store_true", help="py-spy one variant under c=32")
    ap.add_argument("--profile-variant", default="redis", choices=["plain", "memory", "redis"])
    ap.add_argument("--nice", type=int, default=0, help="nice value for benchmark processes")
    ap.add_argument("--repeat", type=int, default=3, help="max trials per disturbed run")
    ap.add_argument("--quiet-wait", type=float, default=20.0)
    ap.add_argument("--noise-budget", type=float, default=180.0)
    ap.add_argument(
        "--wait-others",
        type=float,
        default=1800.0,
        help="wait up to this long for other benchmarks (pgrep) to finish (default 1800 s)",
    )
    ap.add_argument("--max-load", type=float, default=0.5, help="1-minute load to wait for")
    ap.add_argument("--wait-idle", type=float, default=60.0)
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--nginx-port", type=int, default=gb.DEFAULT_NGINX_PORT)
    ap.add_argument("--sluice-port", type=int, default=gb.SLUICE_PORT)
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument(
        "--rounds", type=int, default=7, help="interleaved c=32 rounds (0: skip; default 7)"
    )
    ap.add_argument(
        "--services-core",
        type=int,
        default=int(gb.AUX_CORE),
        help=f"pin Redis and PostgreSQL to this core for the run (default {gb.AUX_CORE}, the "
        "load generator's; -1: leave them unpinned)",
    )
    ap.add_argument(
        "--round-duration", type=int, default=5, help="seconds per interleaved run (default 5)"
    )
    ap.add_argument(
        "--paired-rounds",
        type=int,
        default=7,
        help="rounds of plain and each variant loaded at once, c=32 and c=64 (0: skip)",
    )
    args = ap.parse_args(argv)
    args.machine_notes = []
    args.variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variant_names) - {v.name for v in VARIANTS}
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.duration < 1 or args.warmup < 1:
        ap.error("--duration and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gb.NGINX_PORT = args.nginx_port
    gb.SLUICE_PORT = args.sluice_port
    gb.NICE = args.nice
    gb.OUT = OUT  # nginx's rendered config/log and py-spy output land in our directory
    gb.NoiseBudget.left = args.noise_budget
    t_start = time.monotonic()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 usable CPU cores (0 and 1)")
    for tool in ("wrk", "taskset", "pgrep") + (
        ("psql", "redis-cli") if "redis" in args.variant_names else ()
    ):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    args.facts = gb.machine_facts()
    os.sched_setaffinity(0, {int(gb.AUX_CORE)})
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, gb._raise_sigterm)
    signal.signal(signal.SIGHUP, gb._raise_sigterm)

    pm = gb.ProcessManager()
    pg = PgDatabase()
    results: dict[str, Result] = {}
    commands: dict[str, str] = {}
    direct = None
    profile: dict[str, Any] | None = None
    buckets: list[tuple[str, int, float]] = []
    inter: Interleaved | None = None
    paired: Paired | None = None
    rc = 0
    try:
        gb.require_ports({"nginx mock": gb.NGINX_PORT, "sluice": args.sluice_port})
        if "redis" in args.variant_names:
            if (
                subprocess.run(
                    ["redis-cli", "-u", REDIS_URL, "ping"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
                != "PONG"
            ):
                raise gb.BenchError(f"Redis at {REDIS_URL} does not answer PING")
            psql(PG_ADMIN_DB, "SELECT 1")
        if args.profile:
            gb.find_py_spy()  # install before measuring
        args.machine_notes += wait_for_other_benchmarks(args)
        services_core = None if args.services_core < 0 else args.services_core
        with (
            services_on_core(services_core, args.nice) as services_note,
            tempfile.TemporaryDirectory(prefix="sluice-acct-") as tmp,
        ):
            args.services_note = services_note
            gb.start_nginx(pm, Path(tmp), commands)
            dres = Result("direct", "direct (nginx)")
            measure_series(
                dres, f"http://{HOST}:{gb.NGINX_PORT}/v1/chat/completions", None, args, (1,)
            )
            direct = dres.c1
            args.machine_notes += [f"direct: {n}" for n in dres.notes]
            for v in VARIANTS:
                if v.name not in args.variant_names:
                    continue
                res, prof = measure_variant(pm, v, args, commands, pg if v.postgres else None)
                results[v.name] = res
                if prof:
                    profile = prof
                r = res
                log(
                    f"{v.name}: p50 {f3(p(r.c1, '50'))} ms, p99 {f3(p(r.c1, '99'))} ms, "
                    f"c32 {r.c32.rps:,.0f} req/s, c64 {r.c64.rps:,.0f} req/s, "
                    f"errors {r.non2xx} non-2xx / {r.socket_errors} socket"
                )
            if args.rounds > 0 and "plain" in args.variant_names:
                inter, paired = measure_interleaved(pm, args, commands)
            pm.stop_all()
    except gb.BenchError as e:
        log(f"FAILED: {e}")
        rc = 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        rc = 130
    finally:
        pm.stop_all()
        pg.drop()
    runtime = time.monotonic() - t_start
    if rc != 0:
        return rc

    if profile and profile.get("folded"):
        buckets = profile_buckets(REPO / profile["folded"])
    vers = gb.versions(with_litellm=False)
    redis_v = gb._cmd(["redis-server", "--version"])
    m = re.search(r"v=(\S+)", redis_v)
    vers["redis"] = m.group(1) if m else redis_v
    with contextlib.suppress(gb.BenchError, subprocess.SubprocessError, OSError):
        vers["postgresql"] = psql(PG_ADMIN_DB, "SHOW server_version").split()[0]
    py = gb.venv_bin("python") or sys.executable
    vers.update(gb._pkg_version(py, "redis", "asyncpg", "aiosqlite", "sqlalchemy"))
    table, targets, summary = build_tables(direct, results, inter, paired)
    print()
    print("\n".join(noise_summary(direct, results)))
    print(table)
    print()
    print(targets)
    print()
    for n in args.machine_notes:
        print(f"- {n}")
    for name, r in results.items():
        for n in r.notes:
            print(f"- {name}: {n}")
        if r.final:
            print(f"- {name}: final {json.dumps(r.final)}")
            print(f"- {name}: drains {json.dumps(r.drains)}")
        if r.usage_cli:
            print(f"- {name}: sluice usage:\n{r.usage_cli}")
    if profile and profile.get("own"):
        print(
            f"\npy-spy ({args.profile_variant}, c=32, {profile.get('rps_raw', 0):,.0f} req/s "
            "under py-spy), top functions by own time:"
        )
        for fn, c, pc in profile["own"][:15]:
            print(f"  {pc:5.1f}%  {c:6d}  {fn}")
        print("\nown time by package:")
        for fn, c, pc in profile["packages"]:
            print(f"  {pc:5.1f}%  {c:6d}  {fn}")
        print("\nsluice functions by inclusive time:")
        for fn, c, pc in profile["inclusive"][:25]:
            print(f"  {pc:5.1f}%  {c:6d}  {fn}")
        print("\naccounting buckets (inclusive):")
        for name, c, pc in buckets:
            print(f"  {pc:5.1f}%  {c:6d}  {name}")
    print(f"\ntotal runtime: {runtime:.1f} s")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = OUT / f"results-{stamp}.json"
    out_json.write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "facts"},
                "facts": args.facts,
                "versions": vers,
                "commands": commands,
                "direct_c1": wrk_json(direct),
                "results": {
                    k: {
                        "c1": wrk_json(r.c1),
                        "c32": wrk_json(r.c32),
                        "c64": wrk_json(r.c64),
                        "discarded": [wrk_json(x) for x in r.discarded],
                        "drains": r.drains,
                        "final": r.final,
                        "notes": r.notes,
                        "usage_cli": r.usage_cli,
                    }
                    for k, r in results.items()
                },
                "summary": summary,
                "interleaved": None
                if inter is None
                else {"rps": inter.rps, "foreign_cpu_pct": inter.foreign},
                "paired": None
                if paired is None
                else {f"{n} c={c}": rows for (n, c), rows in paired.runs.items()},
                "profile": profile,
                "profile_buckets": buckets,
                "runtime_s": runtime,
            },
            indent=2,
            default=str,
        )
    )
    log(f"raw results: {out_json.relative_to(REPO)}")
    if args.write_docs:
        write_docs(
            render_section(
                direct,
                results,
                profile,
                buckets,
                args.facts,
                vers,
                commands,
                args,
                runtime,
                inter,
                paired,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
