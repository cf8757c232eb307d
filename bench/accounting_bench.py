"""Auth, limits and usage: the core gateway benchmark with Sluice's accounting on.

Variants, each one `sluice serve` on core 0 in front of the nginx mock (core 1, with wrk):

    plain    bench/sluice-bench.yaml: no auth, usage off -- the baseline
    memory   bench/sluice-accounting-memory.yaml: a virtual key with RPM/TPM/parallel
             limits (in-process limiter), one usage record a request in SQLite
    redis    bench/sluice-accounting-redis.yaml: limits in Redis, keys and usage records in
             a fresh PostgreSQL database (created here, dropped after)
    full     the same as memory (its name in the instruction counts)
    master, nolim, lim   memory with usage off, and the master key / a virtual key without
             limits / with limits;  usage  memory without auth;  rlim  redis with usage
             off;  pgusage  redis without auth or Redis (its usage records alone)
    NAME@base  the variant on the source tree --base-src (an A/B of two trees)

Every variant is sent the same requests, a bearer key included (without auth a stand-in
of a virtual key's length, which Sluice ignores). Phases:

1. --sequential: wrk c=1 on the mock (the latency baseline), then each variant alone:
   c=1 (--latency), c=32, c=64; after each run the usage writer's backlog and the time to
   drain it; after the server stops, usage rows against the 200s it answered.
2. --rounds: every variant's server up at once; wrk --round-conns for --round-duration s
   on each in turn, in rotating order: each round's ratio to the first variant, and the
   server's CPU per request.
3. --paired-rounds: the first variant and each other one loaded at the same time, each
   by its own wrk, both servers sharing core 0: c=32 and c=64.

Redis and PostgreSQL are the machine's own, pinned to core 1 while it runs. Figures and
method: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import harness
import mock_upstream as mock
import yaml
from harness import AUX, GATEWAY, HOST, Bench, BenchError, fmt, spread

PLAIN, MEMORY, REDIS = (
    f"bench/sluice{s}.yaml" for s in ("-bench", "-accounting-memory", "-accounting-redis")
)
OFF = {"usage": {"enabled": False}}
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {  # config, key, changes to it
    "plain": (PLAIN, "none", {}),
    "master": (MEMORY, "master", OFF),
    "nolim": (MEMORY, "nolimits", OFF),
    "lim": (MEMORY, "limits", OFF),
    "memory": (MEMORY, "limits", {}),
    "full": (MEMORY, "limits", {}),  # memory's name in the instruction counts and the history
    "usage": (MEMORY, "none", {"auth": None}),
    "redis": (REDIS, "limits", {}),
    "rlim": (REDIS, "limits", OFF),
    "pgusage": (REDIS, "none", {"auth": None, "redis_url": None}),
}
MASTER_KEY = "sk-bench-master-accounting"
PLAIN_KEY = "sk-sluice-" + "x" * 38  # as long as a virtual key; never checked
# PostgreSQL keeps tpm in an int4: the largest limits that fit and never refuse here.
KEY_SPEC = {"rpm": 100_000_000, "tpm": 2_000_000_000, "max_parallel": 100_000}
SERVICES = ("postgres", "redis-server")
C = ("c1", "c32", "c64")
PG = "postgresql://postgres@127.0.0.1:5432"


def psql(db: str, sql: str) -> str:
    argv = ["psql", f"{PG}/{db}", "-v", "ON_ERROR_STOP=1", "-tAc", sql]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if cp.returncode:
        raise BenchError(f"psql {sql!r}: {cp.stderr.strip()}")
    return cp.stdout.strip()


@dataclass
class Server:
    name: str
    port: int
    proc: harness.Proc
    key: str
    data: Path
    db: str | None  # PostgreSQL database, None on SQLite
    usage: bool

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/chat/completions"

    def wrk(self, bench: Bench, conns: int, duration: int, latency: bool = False) -> harness.Wrk:
        body = mock.REQUEST_BODY
        return bench.wrk(self.url, conns, duration, body=body, auth=self.key, latency=latency)

    def answered(self) -> dict[str, int]:
        """Responses on /v1 routes by status, from /metrics."""
        status, _, data = harness.http("GET", f"http://{HOST}:{self.port}/metrics")
        if status != 200:
            raise BenchError(f"{self.name}: GET /metrics -> {status}")
        by: dict[str, int] = {}
        for line in data.decode().splitlines():
            if line.startswith("sluice_requests_total{") and 'route="models"' not in line:
                code = line.split('status="')[1].split('"')[0]
                by[code] = by.get(code, 0) + int(float(line.rsplit(" ", 1)[1]))
        return by

    def rows(self) -> int:
        if self.db:
            return int(psql(self.db, "SELECT count(*) FROM usage_records"))
        with contextlib.closing(
            sqlite3.connect(f"file:{self.data}/sluice.db?mode=ro", uri=True)
        ) as c:
            return int(c.execute("SELECT count(*) FROM usage_records").fetchone()[0])

    def drain(self, timeout: float = 60.0) -> dict[str, float]:
        """Right after a run: what the usage writer still held, and how long it took."""
        t0 = time.monotonic()
        answered, rows = self.answered().get("200", 0), self.rows()
        backlog = answered - rows
        while rows < answered and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
            rows = self.rows()
        return {"backlog": backlog, "drain_s": round(time.monotonic() - t0, 2)}


def start(
    bench: Bench,
    name: str,
    port: int,
    command: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Server:
    """Variant `name`'s server on `port` (fresh data), its key made and checked. `command`
    replaces `sluice serve` (valgrind, a probe), `env` adds to its environment."""
    variant, _, tree = name.partition("@")
    path, key_mode, changes = VARIANTS[variant]
    slug = name.replace("@", "-")
    data = bench.work / "data" / f"{slug}-{port}"
    shutil.rmtree(data, ignore_errors=True)
    mock_port = bench.args.mock_port
    config = mock.config(bench, path, f"{slug}-{port}", mock_port, data_dir=str(data), **changes)
    settings = yaml.safe_load((harness.REPO / config).read_text())
    src = bench.args.base_src if tree else str(harness.REPO / "src")
    env = {
        "BENCH_UPSTREAM_KEY": "sk-upstream",
        "BENCH_MASTER_KEY": MASTER_KEY,
        "PYTHONPATH": src,
        **(env or {}),
    }
    db = None
    if "database_url" in settings:
        db = f"sluice_bench_{os.getpid()}_{slug.replace('-', '_')}_{port}"
        psql("test", f"DROP DATABASE IF EXISTS {db}")
        psql("test", f"CREATE DATABASE {db}")
        env["BENCH_DATABASE_URL"] = f"{PG}/{db}"
    argv = [
        *(command or [harness.venv_bin("sluice"), "serve"]),
        "--config",
        config,
        "--port",
        str(port),
    ]
    ready = f"http://{HOST}:{port}/readyz"
    try:
        proc = bench.start(slug, argv, cores=GATEWAY, env=env, ready=ready, timeout=timeout)
    except BaseException:
        if db:
            psql("test", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        raise
    key = {"none": PLAIN_KEY, "master": MASTER_KEY}.get(key_mode)
    if key is None:
        spec = json.dumps(KEY_SPEC if key_mode == "limits" else {})
        auth = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
        status, _, body = harness.http("POST", f"http://{HOST}:{port}/admin/keys", spec, auth)
        if status != 201:
            raise BenchError(f"{name}: POST /admin/keys -> {status}: {body[:300]!r}")
        key = json.loads(body)["key"]
    usage = settings.get("usage", {}).get("enabled", True)
    server = Server(name, port, proc, key, data, db, usage)
    check(server, key_mode, "auth" in settings)
    return server


def check(s: Server, key_mode: str, auth: bool) -> None:
    """A request with the key is answered (with limit headers when it has limits); one
    without is refused when auth is on."""
    head = {"Authorization": f"Bearer {s.key}", "Content-Type": "application/json"}
    status, headers, body = harness.http("POST", s.url, mock.REQUEST_BODY, head, timeout=30)
    if status != 200 or (key_mode == "limits" and "x-ratelimit-limit-requests" not in headers):
        raise BenchError(f"{s.name}: {status} {headers} {body[:300]!r}")
    status = harness.http("POST", s.url, mock.REQUEST_BODY, {"Content-Type": "application/json"})[0]
    if auth and status != 401:
        raise BenchError(f"{s.name}: a request without a key -> {status}, not 401")


def stop(bench: Bench, s: Server) -> dict[str, Any]:
    """Stop the server (SIGTERM drains the usage writer), compare rows with the 200s."""
    answered = s.answered()
    bench.stop(s.proc, timeout=60)
    out: dict[str, Any] = {"answered": answered}
    if s.usage:
        out["rows"] = s.rows()
        if out["rows"] != answered.get("200", 0):
            bench.notes.append(f"{s.name}: {out['rows']} usage rows for {answered} answers")
    if s.db:
        psql("test", f"DROP DATABASE IF EXISTS {s.db} WITH (FORCE)")
    return out


@contextlib.contextmanager
def services_on(core: int, nice: int) -> Iterator[None]:
    """Redis and PostgreSQL (every thread) on `core` at `nice`, their sessions' autogroups
    too (see harness.Bench.renice_session), for the run: on the gateway's core their CPU
    would be charged to it (in production they run on other hosts); at nice 0 beside a wrk
    and an nginx at -10 they would wait behind them, idling the gateway."""
    if core < 0:
        yield
        return
    saved = {}
    for tid in _service_threads():
        with contextlib.suppress(OSError):
            group = Path(f"/proc/{tid}/autogroup")
            was = int(group.read_text().split()[-1])
            saved[tid] = (os.sched_getaffinity(tid), os.getpriority(os.PRIO_PROCESS, tid), was)
            os.sched_setaffinity(tid, {core})
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            group.write_text(str(nice))
    try:
        yield
    finally:
        default = (set(os.sched_getaffinity(0)) | {int(GATEWAY)}, 0, 0)
        for tid in _service_threads():
            cores, value, group = saved.get(tid, default)  # backends forked meanwhile
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)
                os.setpriority(os.PRIO_PROCESS, tid, value)
                Path(f"/proc/{tid}/autogroup").write_text(str(group))


def _service_threads() -> list[int]:
    tids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "comm").read_text().strip() in SERVICES:
                tids += [int(t.name) for t in (proc / "task").iterdir()]
    return tids


def sequential(bench: Bench, names: list[str]) -> dict[str, Any]:
    """The mock at c=1, then each variant alone: c=1, c=32, c=64."""
    args = bench.args
    direct = f"http://{HOST}:{args.mock_port}/v1/chat/completions"
    run = partial(bench.wrk, direct, 1, args.duration, body=mock.REQUEST_BODY, latency=True)
    out: dict[str, Any] = {"direct": {"c1": bench.measure("direct c=1", run)}}
    for name in names:
        s = start(bench, name, args.port)
        bench.apart = frozenset(SERVICES if s.db else ())
        s.wrk(bench, 8, args.warmup)
        if s.usage:
            s.drain()
        res: dict[str, Any] = {}
        for c in (1, 32, 64):

            def once(c: int = c, s: Server = s) -> dict[str, Any]:
                w = s.wrk(bench, c, args.duration, latency=True)
                return {"wrk": w, "drain": s.drain() if s.usage else None}

            res[f"c{c}"], res[f"cpu_c{c}"] = bench.measure(f"{name} c={c}", once)
        res["end"] = stop(bench, s)
        out[name] = res
        harness.log(f"{name}: c=1 {res['c1']['wrk'].latency_ms}, c=32 {res['c32']['wrk'].rps}")
    bench.apart = frozenset()
    return out


def interleaved(bench: Bench, servers: list[Server]) -> dict[str, Any]:
    """Every server up; one wrk at a time, in rotating order."""
    args = bench.args
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    for r in range(args.rounds):
        for name in harness.rotation(list(runs), r):
            s = next(x for x in servers if x.name == name)
            cpu0 = s.proc.cpu_seconds()
            w = s.wrk(bench, args.round_conns, args.round_duration, latency=True)
            cpu_us = (s.proc.cpu_seconds() - cpu0) / max(w.requests, 1) * 1e6
            runs[name].append({"rps": w.rps, "cpu_us": cpu_us, "errors": w.errors, **w.latency_ms})
        harness.log(
            f"round {r + 1}: " + ", ".join(f"{n} {v[-1]['rps']:,.0f}" for n, v in runs.items())
        )
    return runs


def paired(bench: Bench, servers: list[Server]) -> dict[str, Any]:
    """The first server and each other loaded at once (both on core 0, which the scheduler
    shares between them): both see the machine's speed of the same instant."""
    base, out = servers[0], {}
    for r in range(bench.args.paired_rounds):
        for conns in (32, 64):
            for s in servers[1:]:
                pair = (s, base)
                cpu0 = [x.proc.cpu_seconds() for x in pair]
                # which wrk starts first alternates
                loads = [partial(x.wrk, bench, conns, bench.args.round_duration) for x in pair]
                got = harness.together(*loads) if r % 2 else harness.together(*loads[::-1])[::-1]
                cpu = [x.proc.cpu_seconds() - c for x, c in zip(pair, cpu0, strict=True)]
                out.setdefault(f"{s.name} c={conns}", []).append(
                    {
                        "rps": got[0].rps,
                        "base_rps": got[1].rps,
                        "cpu_s": cpu[0],
                        "base_cpu_s": cpu[1],
                    }
                )
                harness.log(f"paired {r + 1} c={conns}: {s.name} {got[0].rps / got[1].rps:.1%}")
    return out


def report(names: list[str], seq: dict[str, Any], inter: dict, pair: dict) -> list[str]:
    tables = []
    if seq:
        d = seq["direct"]["c1"][0].latency_ms
        first = seq[names[0]]["c32"]["wrk"].rps

        def ms(r: dict, c: str, p: str) -> str:
            return fmt(r[c]["wrk"].latency_ms[p], 3)

        def usage(r: dict, text: str) -> str:
            return text if r["c1"]["drain"] else "usage off"

        spec: list[tuple[str, str, Callable[[dict], str]]] = [
            ("p50 latency, c=1 (ms)", fmt(d["50"], 3), lambda r: ms(r, "c1", "50")),
            ("p50 overhead vs direct, c=1 (ms)", "",
             lambda r: f"{r['c1']['wrk'].latency_ms['50'] - d['50']:+.3f}"),
            ("p99 latency, c=1 (ms)", fmt(d["99"], 3), lambda r: ms(r, "c1", "99")),
            ("req/s, c=32", "", lambda r: fmt(r["c32"]["wrk"].rps)),
            (f"req/s c=32, % of {names[0]}", "", lambda r: f"{r['c32']['wrk'].rps / first:.1%}"),
            ("req/s, c=64", "", lambda r: fmt(r["c64"]["wrk"].rps)),
            ("p50 / p99 latency, c=32 (ms)", "",
             lambda r: f"{ms(r, 'c32', '50')} / {ms(r, 'c32', '99')}"),
            ("errors: wrk non-2xx + socket", "", lambda r: str(sum(r[c]["wrk"].errors for c in C))),
            ("usage backlog at end of c=1 / c=32 / c=64 (rows)", "",
             lambda r: usage(r, " / ".join(str((r[c]["drain"] or {}).get("backlog")) for c in C))),
            ("usage rows / 200 responses, after stop", "",
             lambda r: usage(r, f"{r['end'].get('rows')} / {r['end']['answered'].get('200')}")),
            ("CPU busy during c=32, core 0 / core 1", "",
             lambda r: " / ".join(f"{x:.0f}%" for x in r["cpu_c32"].cores_pct[:2])),
            ("Redis + PostgreSQL CPU during c=32", "", lambda r: f"{r['cpu_c32'].apart_pct:.0f}%"),
        ]  # fmt: skip
        rows = [[label, dcell, *(get(seq[n]) for n in names)] for label, dcell, get in spec]
        tables.append(harness.table(["Metric", "direct (nginx)", *names], rows))
    if inter:
        rows = []
        for n, runs in inter.items():
            ratios = [a["rps"] / b["rps"] for a, b in zip(runs, inter[names[0]], strict=True)]
            rows.append(
                [
                    n,
                    fmt(median(runs, "rps")),
                    ratio(ratios),
                    fmt(median(runs, "cpu_us"), 1),
                    f"{fmt(median(runs, '50'), 3)} / {fmt(median(runs, '99'), 3)}",
                ]
            )
        head = ["interleaved", "median req/s", f"% of {names[0]}", "CPU µs/request", "p50 / p99 ms"]
        tables.append(harness.table(head, rows))
    if pair:
        rows = [
            [label, ratio([x["rps"] / x["base_rps"] for x in runs]),
             ratio([x["rps"] * x["base_cpu_s"] / x["cpu_s"] / x["base_rps"] for x in runs]),
             ratio([x["cpu_s"] / (x["cpu_s"] + x["base_cpu_s"]) for x in runs])]
            for label, runs in pair.items()
        ]  # fmt: skip
        head = [f"paired with {names[0]}", "req/s", "requests per CPU second", "share of core 0"]
        tables.append(harness.table(head, rows))
    return tables


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def ratio(values: list[float]) -> str:
    """Median (lowest-highest) of per-round ratios, in %."""
    s = spread(values)
    return f"{s['median']:.1%} ({s['low']:.1%}-{s['high']:.1%})"


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--variants", default="plain,memory,redis", help=", ".join(VARIANTS))
    parser.add_argument("--duration", type=int, default=10, help="s per sequential wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="s of wrk c=8 per server")
    parser.add_argument("--sequential", choices=["yes", "no"], default="yes")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (0: none)")
    parser.add_argument("--round-conns", type=int, default=32)
    parser.add_argument("--round-duration", type=int, default=5)
    parser.add_argument("--paired-rounds", type=int, default=7, help="0: none")
    parser.add_argument("--port", type=int, default=8080, help="the first Sluice port")
    parser.add_argument("--mock-port", type=int, default=mock.PORT)
    parser.add_argument("--services-core", type=int, default=int(AUX), help="-1: unpinned")
    parser.add_argument("--base-src", help="the src/ folder NAME@base variants run on")
    args = harness.parse(parser)
    names = args.variants.split(",")
    if unknown := {n.partition("@")[0] for n in names} - VARIANTS.keys():
        parser.error(f"unknown variants {unknown}")
    if any("@" in n for n in names) and not args.base_src:
        parser.error("NAME@base variants need --base-src")
    seq: dict[str, Any] = {}
    inter: dict[str, Any] = {}
    pair: dict[str, Any] = {}
    with Bench("accounting", args) as bench, services_on(args.services_core, args.nice):
        mock.start(bench, args.mock_port)
        if args.sequential == "yes":
            seq = sequential(bench, names)
        if args.rounds or args.paired_rounds:
            servers = [start(bench, n, args.port + 1 + i) for i, n in enumerate(names)]
            bench.apart = frozenset(SERVICES if any(s.db for s in servers) else ())
            for s in servers:
                s.wrk(bench, 8, args.warmup)
            inter = interleaved(bench, servers) if args.rounds else {}
            pair = paired(bench, servers) if args.paired_rounds and len(servers) > 1 else {}
            for s in servers:
                stop(bench, s)
        bench.machine["versions"] = harness.versions(
            "sluice-gateway",
            "uvicorn",
            "uvloop",
            "httptools",
            "orjson",
            "redis",
            "asyncpg",
            "aiosqlite",
            "sqlalchemy",
        ) | {
            "postgresql": psql("test", "SHOW server_version"),
            "redis": harness.command_output(["redis-server", "--version"]),
        }
        bench.finish(
            {"sequential": seq, "interleaved": inter, "paired": pair},
            report(names, seq, inter, pair),
        )
    return 0


if __name__ == "__main__":
    harness.main(main)
