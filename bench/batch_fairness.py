"""Batches (issue 24): is interactive traffic as fast while a batch runs?

Sluice on core 0 (bench/sluice-accounting-memory.yaml, as accounting_bench.py's `memory`
variant: a virtual key with limits, usage records in SQLite, the default) in front of the
nginx mock on core 1. Interactive traffic: this script's own open-loop client (core 1),
--rate requests a second at fixed send times over --conns keep-alive connections, one
virtual key; the rate defaults to --rate-fraction of the capacity measured first (wrk c=32
through the same key), so that the gateway has room to give a batch (a core at 100% cannot
give a batch anything without slowing someone). Each round, in rotating order:

    base    the interactive traffic alone for --duration s
    with    a --lines-line batch (another virtual key; uploaded to /v1/files, created with
            /v1/batches, same model and nginx), the window opened once --warm-lines lines
            are done; interactive requests count while the batch still has lines to run
    alone   the same batch with no interactive traffic: its best speed

Reported: interactive p50/p90/p99 (ms, from send to the last byte), the batch's lines/s
in the window (its counts polled once a second), its total time, and Sluice's CPU.
Figures and reading: docs/benchmarks.md, "Batches (issue 24)".

    python bench/batch_fairness.py --nice -10
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import accounting_bench as acct
import harness
import mock_upstream as mock
import uvloop
from harness import HOST, Bench, BenchError, fmt, spread

TARGET_P50_RATIO = 1.10
CONDITIONS = ("base", "with", "alone")
KEY_SPEC = acct.KEY_SPEC


# ------------------------------------------------------------------ a small HTTP/1.1 client


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


def _request(method: str, path: str, key: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Sample:
    sent: float  # perf_counter, s
    latency_ms: float
    late_ms: float  # how long after its scheduled time the client sent it
    status: int


@dataclass
class Traffic:
    samples: list[Sample] = field(default_factory=list)
    progress: list[tuple[float, int, str]] = field(default_factory=list)  # t, lines ended, status
    t0: float = 0.0
    t1: float = 0.0


async def _sender(
    port: int, raw: bytes, start: float, rate: float, conns: int, index: int, end: float,
    out: list[Sample],
) -> None:  # fmt: skip
    """Connection `index` of `conns`: sends at start + (k * conns + index) / rate."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        k = 0
        while True:
            due = start + (k * conns + index) / rate
            if due >= end:
                return
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            sent = time.perf_counter()
            status, _ = await _exchange(reader, writer, raw)
            done = time.perf_counter()
            out.append(Sample(sent, (done - sent) * 1e3, (sent - due) * 1e3, status))
            k += 1
    finally:
        writer.close()


async def _poll(port: int, key: str, batch_id: str, end: float, out: Traffic) -> None:
    """The batch's lines ended (completed + failed), once a second, until `end`."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        raw = _request("GET", f"/v1/batches/{batch_id}", key)
        while True:
            now = time.perf_counter()
            _, body = await _exchange(reader, writer, raw)
            batch = json.loads(body)
            counts = batch["request_counts"]
            out.progress.append((now, counts["completed"] + counts["failed"], batch["status"]))
            if now >= end:
                return
            await asyncio.sleep(min(1.0, max(end - time.perf_counter(), 0.0)))
    finally:
        writer.close()


async def _traffic(
    port: int, key: str, rate: float, conns: int, duration: float,
    batch: tuple[str, str] | None,
) -> Traffic:  # fmt: skip
    raw = _request("POST", "/v1/chat/completions", key, mock.REQUEST_BODY.encode())
    out = Traffic()
    out.t0 = time.perf_counter() + 0.05
    out.t1 = out.t0 + duration
    tasks = [_sender(port, raw, out.t0, rate, conns, i, out.t1, out.samples) for i in range(conns)]
    if batch is not None:
        tasks.append(_poll(port, batch[1], batch[0], out.t1, out))
    await asyncio.gather(*tasks)
    return out


def traffic(
    port: int, key: str, rate: float, conns: int, duration: float,
    batch: tuple[str, str] | None = None,
) -> Traffic:  # fmt: skip
    """Interactive requests at `rate` for `duration` s; with `batch` (id, key), its progress."""
    return uvloop.run(_traffic(port, key, rate, conns, duration, batch))


# ------------------------------------------------------------------ batches


def upload(port: int, key: str, lines: int, tag: str) -> str:
    """A batch input file of `lines` chat requests (the mock's model), uploaded."""
    rows = []
    for i in range(lines):
        messages = [{"role": "user", "content": f"Say hello ({tag} {i})."}]
        body = {"model": mock.MODEL, "messages": messages, "max_tokens": 16}
        rows.append(
            json.dumps(
                {
                    "custom_id": f"{tag}-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                },
                separators=(",", ":"),
            )
        )
    content = ("\n".join(rows) + "\n").encode()
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{tag}.jsonl"'
        "\r\nContent-Type: application/jsonl\r\n\r\n",
    ]
    data = "".join(parts).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    head = {"Authorization": f"Bearer {key}"}
    head["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    status, body_ = _post_bytes(f"http://{HOST}:{port}/v1/files", data, head)
    if status != 200:
        raise BenchError(f"POST /v1/files -> {status}: {body_[:300]!r}")
    return str(json.loads(body_)["id"])


def _post_bytes(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data, headers, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def create(port: int, key: str, file_id: str) -> str:
    spec = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    spec["completion_window"] = "24h"
    head = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = f"http://{HOST}:{port}/v1/batches"
    status, _, body = harness.http("POST", url, json.dumps(spec), head, timeout=60)
    if status != 200:
        raise BenchError(f"POST /v1/batches -> {status}: {body[:300]!r}")
    batch = json.loads(body)
    if batch["status"] != "in_progress":
        raise BenchError(f"batch {batch['id']} is {batch['status']}: {batch.get('errors')}")
    return str(batch["id"])


def get(port: int, key: str, batch_id: str) -> dict[str, Any]:
    head = {"Authorization": f"Bearer {key}"}
    status, _, body = harness.http("GET", f"http://{HOST}:{port}/v1/batches/{batch_id}", None, head)
    if status != 200:
        raise BenchError(f"GET /v1/batches/{batch_id} -> {status}: {body[:300]!r}")
    return dict(json.loads(body))


def cancel(port: int, key: str, batch_id: str) -> None:
    """Cancel the batch and wait until it is cancelled (its running lines ended)."""
    head = {"Authorization": f"Bearer {key}"}
    url = f"http://{HOST}:{port}/v1/batches/{batch_id}/cancel"
    status, _, body = harness.http("POST", url, "", head)
    if status != 200:
        raise BenchError(f"POST {url} -> {status}: {body[:300]!r}")
    t0 = time.perf_counter()
    while get(port, key, batch_id)["status"] != "cancelled":
        if time.perf_counter() - t0 > 60:
            raise BenchError(f"batch {batch_id} not cancelled after 60 s")
        time.sleep(0.25)


def ended(batch: dict[str, Any]) -> int:
    counts = batch["request_counts"]
    return int(counts["completed"] + counts["failed"])


def wait_lines(port: int, key: str, batch_id: str, lines: int, timeout: float) -> float:
    """Poll (every 0.1 s) until `lines` lines have ended; the time it took."""
    t0 = time.perf_counter()
    while ended(get(port, key, batch_id)) < lines:
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"batch {batch_id}: fewer than {lines} lines after {timeout:.0f} s")
        time.sleep(0.1)
    return time.perf_counter() - t0


def wait_final(port: int, key: str, batch_id: str, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    while (batch := get(port, key, batch_id))["status"] != "completed":
        if batch["status"] in ("failed", "expired", "cancelled"):
            raise BenchError(f"batch {batch_id} ended {batch['status']}")
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"batch {batch_id} not completed after {timeout:.0f} s")
        time.sleep(0.25)
    return batch


# ------------------------------------------------------------------ the conditions


def summary(samples: list[Sample], seconds: float) -> dict[str, Any]:
    lat = [s.latency_ms for s in samples]
    late = [s.late_ms for s in samples]
    return {
        "requests": len(samples),
        "rate": round(len(samples) / seconds, 1) if seconds > 0 else None,
        "errors": sum(s.status != 200 for s in samples),
        "p50_ms": harness.pct(lat, 50),
        "p90_ms": harness.pct(lat, 90),
        "p99_ms": harness.pct(lat, 99),
        "late_p99_ms": harness.pct(late, 99),
    }


@dataclass
class Ctx:
    bench: Bench
    server: acct.Server
    batch_key: str
    rate: float


def run_base(c: Ctx, r: int) -> dict[str, Any]:
    a = c.bench.args
    cpu0 = c.server.proc.cpu_seconds()
    t = traffic(c.server.port, c.server.key, c.rate, a.conns, a.duration)
    out = summary(t.samples, t.t1 - t.t0)
    out["sluice_cpu_pct"] = round(100 * (c.server.proc.cpu_seconds() - cpu0) / (t.t1 - t.t0))
    return out


def run_batch(c: Ctx, r: int, interactive: bool, lines: int = 0) -> dict[str, Any]:
    """A fresh batch of --lines (or `lines`) lines; with `interactive`, the window opens
    once --warm-lines have ended."""
    a, port = c.bench.args, c.server.port
    lines = lines or a.lines
    tag = f"r{r}-{'with' if interactive else 'alone'}-{uuid.uuid4().hex[:6]}"
    file_id = upload(port, c.batch_key, lines, tag)
    t_create = time.perf_counter()
    batch_id = create(port, c.batch_key, file_id)
    created_s = time.perf_counter() - t_create
    out: dict[str, Any] = {"batch_id": batch_id, "create_s": round(created_s, 3)}
    if interactive:
        wait_lines(port, c.batch_key, batch_id, a.warm_lines, 120)
        cpu0 = c.server.proc.cpu_seconds()
        t = traffic(port, c.server.key, c.rate, a.conns, a.duration, (batch_id, c.batch_key))
        window = t.t1 - t.t0
        out["sluice_cpu_pct"] = round(100 * (c.server.proc.cpu_seconds() - cpu0) / window)
        # The batch covers the window until the first poll that saw every line ended.
        done_at = next((p[0] for p in t.progress if p[1] >= lines), None)
        covered_until = min(done_at, t.t1) if done_at is not None else t.t1
        inside = [s for s in t.samples if s.sent < covered_until]
        out |= summary(inside, covered_until - t.t0)
        out["covered_s"] = round(covered_until - t.t0, 2)
        first, last = t.progress[0], t.progress[-1]
        if done_at is not None:
            last = next(p for p in t.progress if p[0] == done_at)
        out["lines_in_window"] = last[1] - first[1]
        out["lines_per_s"] = round((last[1] - first[1]) / max(last[0] - first[0], 1e-9), 1)
        out["progress"] = [(round(p[0] - t.t0, 2), p[1]) for p in t.progress]
        if done_at is not None and done_at < t.t1 - 1.0:
            c.bench.notes.append(
                f"round {r + 1} with: the batch ended {t.t1 - done_at:.1f} s before the window "
                "did; only the requests sent before then are counted"
            )
    if interactive and a.cancel_after_window:
        cancel(port, c.batch_key, batch_id)
        out["cancelled"] = True
        out["total_s"] = None
        return out
    wait_lines(port, c.batch_key, batch_id, lines, 600)
    out["lines_done_s"] = round(time.perf_counter() - t_create, 2)
    final = wait_final(port, c.batch_key, batch_id, 600)
    total = time.perf_counter() - t_create
    out["total_s"] = round(total, 2)
    out["request_counts"] = final["request_counts"]
    if not interactive:
        out["lines_per_s"] = round(lines / out["lines_done_s"], 1)
    if final["request_counts"]["failed"]:
        c.bench.notes.append(f"round {r + 1}: {final['request_counts']} failed lines")
    return out


# ------------------------------------------------------------------ report


def report(rounds: list[dict[str, Any]], rate: float, capacity: float, lines: int) -> list[str]:
    rows = []
    for i, rd in enumerate(rounds):
        b, w, al = rd["base"], rd["with"], rd.get("alone", {})
        rows.append([
            f"round {i + 1} ({' → '.join(rd['order'])})",
            f"{b['p50_ms']:.3f} / {b['p90_ms']:.3f} / {b['p99_ms']:.3f}",
            f"{w['p50_ms']:.3f} / {w['p90_ms']:.3f} / {w['p99_ms']:.3f}",
            f"{w['p50_ms'] / b['p50_ms']:.2f}",
            f"{b['sluice_cpu_pct']}% / {w['sluice_cpu_pct']}%",
            fmt(w["lines_per_s"]), fmt(w["total_s"], 1),
            fmt(al.get("lines_per_s")), fmt(al.get("total_s"), 1),
        ])  # fmt: skip
    header = [
        "round (order)", "base p50 / p90 / p99 (ms)", "with batch p50 / p90 / p99 (ms)",
        "p50 ratio", "Sluice CPU base / with", "batch lines/s in window", "batch total (s)",
        "batch alone lines/s", "alone total (s)",
    ]  # fmt: skip
    ratios = [rd["with"]["p50_ms"] / rd["base"]["p50_ms"] for rd in rounds]
    share = [
        rd["with"]["lines_per_s"] / rd["alone"]["lines_per_s"] for rd in rounds if "alone" in rd
    ]
    s, sh = spread(ratios), spread(share or [0.0])
    summary_rows = [
        ["interactive rate", f"{rate:,.0f} req/s ({rate / capacity:.0%} of {capacity:,.0f})"],
        ["batch", f"{lines:,} lines"],
        ["p50 with / without, median (low-high)",
         f"{s['median']:.2f} ({s['low']:.2f}-{s['high']:.2f})"],
        ["batch speed in window / alone, median (low-high)",
         f"{sh['median']:.2f} ({sh['low']:.2f}-{sh['high']:.2f})"],
        ["target: p50 within 10%", "met" if s["median"] <= TARGET_P50_RATIO else "missed"],
    ]  # fmt: skip
    return [harness.table(header, rows), harness.table("Figure | Value", summary_rows)]


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="s of interactive traffic")
    parser.add_argument("--rate", type=float, default=0.0, help="req/s (0: from capacity)")
    parser.add_argument("--rate-fraction", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=16, help="interactive connections")
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--warm-lines", type=int, default=200)
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--mock-port", type=int, default=9800)
    parser.add_argument("--base-src", default=None, help="(accounting_bench's option)")
    parser.add_argument(
        "--cancel-after-window",
        action="store_true",
        help="cancel the batch when the window closes (a paced lever's A/B: no total time)",
    )
    parser.add_argument(
        "--conditions", default=",".join(CONDITIONS), help="of base,with,alone (a lever's A/B)"
    )
    parser.add_argument(
        "--sluice-env", default="", help="NAME=VALUE,... for Sluice (a lever to try)"
    )
    args = harness.parse(parser)
    conditions = [c for c in CONDITIONS if c in args.conditions.split(",")]
    if not {"base", "with"} <= set(conditions):
        raise BenchError("--conditions must include base and with")
    with Bench("batch_fairness", args) as bench:
        mock.start(bench, args.mock_port)
        env = dict(item.split("=", 1) for item in args.sluice_env.split(",") if item)
        server = acct.start(bench, "memory", args.port, env=env)
        auth = {"Authorization": f"Bearer {acct.MASTER_KEY}", "Content-Type": "application/json"}
        url = f"http://{HOST}:{args.port}/admin/keys"
        status, _, body = harness.http("POST", url, json.dumps(KEY_SPEC), auth)
        if status != 201:
            raise BenchError(f"POST /admin/keys -> {status}: {body[:300]!r}")
        batch_key = json.loads(body)["key"]
        server.wrk(bench, 8, 3)  # warm-up
        capacity_run, capacity_cpu = bench.measure(
            "capacity c=32", lambda: server.wrk(bench, 32, 5)
        )
        capacity = capacity_run.rps
        rate = args.rate or round(capacity * args.rate_fraction / 50) * 50
        harness.log(f"capacity {capacity:,.0f} req/s; interactive rate {rate:,.0f} req/s")
        c = Ctx(bench, server, batch_key, rate)
        traffic(server.port, server.key, rate, args.conns, 2.0)  # warm the client path
        warm = run_batch(c, -1, False, args.warm_lines)  # the batch path, warm
        harness.log(f"warm-up batch: {warm.get('lines_per_s')} lines/s")
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            order = harness.rotation(conditions, r)
            rd: dict[str, Any] = {"order": order}
            for cond in order:
                fn = {
                    "base": lambda r=r: run_base(c, r),
                    "with": lambda r=r: run_batch(c, r, True),
                    "alone": lambda r=r: run_batch(c, r, False),
                }[cond]
                rd[cond], rd[f"cpu_{cond}"] = bench.measure(f"round {r + 1} {cond}", fn)
            rounds.append(rd)
            b, w, al = rd["base"], rd["with"], rd.get("alone", {})
            harness.log(
                f"round {r + 1}: p50 base {b['p50_ms']:.3f} with {w['p50_ms']:.3f} ms; "
                f"batch {w['lines_per_s']} lines/s in window, {al.get('lines_per_s')} alone"
            )
        after = acct.stop(bench, server)
        bench.machine["versions"] = harness.versions("sluice-gateway", "uvicorn", "uvloop")
        results = {
            "capacity": {"run": capacity_run, "cpu": capacity_cpu},
            "rate": rate,
            "warm_batch": warm,
            "rounds": rounds,
            "server": after,
            "p50_ratios": [rd["with"]["p50_ms"] / rd["base"]["p50_ms"] for rd in rounds],
            "sluice_env": env,
            "pid": os.getpid(),
        }
        bench.finish(results, report(rounds, rate, capacity, args.lines))
    return 0


if __name__ == "__main__":
    harness.main(main)
