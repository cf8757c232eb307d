"""Slowloris: does a normal client keep its latency, and are slow connections cut in time?

Per --repeat, a fresh gateway (bench/sluice-bench.yaml, access log off, header and body
timeouts 10 s) on core 0 in front of the nginx mock (core 1): a normal client (one
keep-alive connection, one POST at a time) measures its latency for --seconds on the idle
gateway, then again while another process (core 1) holds --connections slow connections,
half trickling their headers a byte a second, half their body, each reopened when cut;
the attack goes on until every connection has been cut once. Figures: docs/security/edge.md.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import harness
import mock_upstream as mock
import uvloop
from harness import AUX, GATEWAY, HOST, Bench

TIMEOUT = 10.0  # server.header_timeout and server.body_timeout


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def client(port: int, seconds: float) -> dict[str, float]:
    """p50/p99 (ms) of sequential requests on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    body = mock.REQUEST_BODY.encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise harness.BenchError(f"unexpected answer: {head[:200]!r}")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        times.append((time.perf_counter() - started) * 1000)
    writer.close()
    ordered = sorted(times)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return {
        "requests": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(p99, 3),
    }


async def slow(port: int, body: bool, stop: asyncio.Event, lives: list[tuple[str, float]]) -> None:
    """One slow connection, reopened each time the server cuts it."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n".encode()
    head += (
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        if body
        else b"X-Slow: "
    )
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened = time.monotonic()
        writer.write(head)
        try:
            while not stop.is_set():
                try:
                    if not await asyncio.wait_for(reader.read(4096), 1.0):
                        break  # cut by the server
                except TimeoutError:
                    writer.write(b"a")  # a byte a second: never idle, never done
        except OSError:
            pass
        writer.close()
        if not stop.is_set():
            lives.append(("body" if body else "headers", time.monotonic() - opened))


def attacker(port: int, connections: int, seconds: float, result: Any) -> None:
    async def attack() -> None:
        stop, lives = asyncio.Event(), []
        tasks = [
            asyncio.create_task(slow(port, i % 2 == 1, stop, lives)) for i in range(connections)
        ]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        result.put(lives)

    raise_nofile(connections + 256)
    uvloop.run(attack())


def one_run(bench: Bench, mock_port: int, port: int) -> dict[str, Any]:
    args = bench.args
    timeouts = {"header_timeout": TIMEOUT, "body_timeout": TIMEOUT}
    config = mock.config(
        bench,
        "bench/sluice-bench.yaml",
        "sluice",
        mock_port,
        server=timeouts,
        logging={"access_log": False},
    )
    argv = [harness.venv_bin("sluice"), "serve", "--config", config, "--port", str(port)]
    env = {"BENCH_UPSTREAM_KEY": "sk-upstream", "PYTHONPATH": str(harness.REPO / "src")}
    proc = bench.start("sluice", argv, cores=GATEWAY, env=env, ready=f"http://{HOST}:{port}/readyz")
    try:
        uvloop.run(client(port, 2))  # warm-up
        idle = uvloop.run(client(port, args.seconds))
        result: Any = multiprocessing.Queue()
        hold = 2 + args.seconds + TIMEOUT + 3  # every connection opened while measuring is cut once
        attack = multiprocessing.Process(
            target=attacker, args=(port, args.connections, hold, result)
        )
        attack.start()
        os.sched_setaffinity(attack.pid or 0, {int(AUX)})
        time.sleep(2)  # every slow connection open
        held = sum(
            os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{proc.pid}/fd").iterdir()
        )
        loaded = uvloop.run(client(port, args.seconds))
        lives = result.get(timeout=hold + 30)
        attack.join(10)
    finally:
        bench.stop(proc)
    cut = {}
    for kind in ("headers", "body"):
        v = sorted(life for k, life in lives if k == kind)
        cut[kind] = (
            {
                "cut": len(v),
                "min_s": round(v[0], 2),
                "p50_s": round(statistics.median(v), 2),
                "max_s": round(v[-1], 2),
            }
            if v
            else {"cut": 0}
        )
    ratio = round(loaded["p50_ms"] / idle["p50_ms"], 2)
    return {"idle": idle, "attack": loaded, "p50_ratio": ratio, "gateway_sockets": held, "cut": cut}


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=3, help="fresh gateways, one run each")
    args = harness.parse(parser)
    raise_nofile(args.connections * 2 + 1024)
    with Bench("slowloris", args) as bench:
        os.sched_setaffinity(0, range(os.cpu_count() or 2))  # the client as before: unpinned
        mock.start(bench, 9180)
        runs = [one_run(bench, 9180, 8180) for _ in range(args.repeat)]
        rows = [
            [
                i,
                f"{r['idle']['p50_ms']} / {r['idle']['p99_ms']}",
                f"{r['attack']['p50_ms']} / {r['attack']['p99_ms']}",
                r["p50_ratio"],
                r["gateway_sockets"],
                *(
                    f"{c['cut']} ({c.get('min_s')}/{c.get('p50_s')}/{c.get('max_s')})"
                    for c in r["cut"].values()
                ),
            ]
            for i, r in enumerate(runs, 1)
        ]
        head = ["run", "idle p50/p99 ms", "attack p50/p99 ms", "ratio", "gateway sockets"]
        head += ["cut headers (min/p50/max s)", "cut body (min/p50/max s)"]
        bench.finish({"runs": runs}, [harness.table(head, rows)])
    return 0


if __name__ == "__main__":
    harness.main(main)
