"""Slowloris against the gateway: does a normal client keep its latency, and are the slow
connections cut at the deadline? (issue 18; figures in docs/security/edge.md)

    python bench/slowloris.py [--connections 2000] [--seconds 15] [--repeat 3]

Per repeat, a fresh gateway on core 0 (taskset) in front of the nginx mock (core 1):

1. idle: a normal client (one keep-alive connection, one POST /v1/chat/completions at a
   time) measures its latency for ``--seconds``;
2. attack: another process (core 1) holds ``--connections`` slow connections, half
   trickling their headers one byte a second, half their body, and opens a new one each
   time one is cut, while the same client measures again for ``--seconds``; the attack
   then goes on until every connection has been cut at least once.

It prints and writes (bench/.work/slowloris/results.json) each phase's p50/p99, how many
slow connections were cut and how long they had lived (the deadline: server.header_timeout
for the header trickle, server.body_timeout after the headers for the body trickle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb  # the shared harness: processes, pinning, nginx

OUT = gb.WORK / "slowloris"
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((gb.HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


# ---------------------------------------------------------------- the normal client


def chat_request(port: int) -> bytes:
    body = gb.REQUEST_BODY.encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {gb.HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def measure(port: int, seconds: float) -> list[float]:
    """Latencies (ms) of sequential requests on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(gb.HOST, port)
    request = chat_request(port)
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        latencies.append((time.perf_counter() - started) * 1000)
    writer.close()
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 3),
    }


# ---------------------------------------------------------------- the attacker


async def slow_connection(
    port: int, trickle_body: bool, stop: asyncio.Event, lifetimes: list[tuple[str, float]]
) -> None:
    """One slowloris connection, reopened each time the server cuts it."""
    kind = "body" if trickle_body else "headers"
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {gb.HOST}:{port}\r\n".encode()
    if trickle_body:
        head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    else:
        head += b"X-Slow: "
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(gb.HOST, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened = time.monotonic()
        writer.write(head)
        try:
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except TimeoutError:
                    writer.write(b"a")  # one byte a second: never idle, never done
                    continue
                if not data:
                    break  # cut by the server
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        if not stop.is_set():
            lifetimes.append((kind, time.monotonic() - opened))


async def attack(port: int, connections: int, seconds: float, result: Any) -> None:
    stop = asyncio.Event()
    lifetimes: list[tuple[str, float]] = []
    tasks = [
        asyncio.create_task(slow_connection(port, i % 2 == 1, stop, lifetimes))
        for i in range(connections)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    result.put(lifetimes)


def attacker_main(port: int, connections: int, seconds: float, result: Any) -> None:
    raise_nofile(connections + 256)
    uvloop.run(attack(port, connections, seconds, result))


# ---------------------------------------------------------------- one run


def start_gateway(pm: gb.ProcessManager, port: int, upstream_port: int) -> gb.Proc:
    config = yaml.safe_load((gb.BENCH / "sluice-bench.yaml").read_text())
    config["server"].update(port=port, body_timeout=BODY_TIMEOUT, header_timeout=HEADER_TIMEOUT)
    config["logging"]["access_log"] = False
    text = yaml.safe_dump(config).replace(f":{gb.DEFAULT_NGINX_PORT}/", f":{upstream_port}/")
    path = OUT / "sluice.yaml"
    path.write_text(text)
    env = {**os.environ, "BENCH_UPSTREAM_KEY": gb.UPSTREAM_KEY}
    serve = [sys.executable, "-m", "sluice", "serve", "--config", str(path)]
    argv = [*gb.pin(gb.GATEWAY_CORE), *serve]
    proc = pm.start("sluice", argv, OUT / "sluice.log", env=env)
    gb.wait_ready(proc, f"http://{gb.HOST}:{port}/readyz", timeout=30)
    return proc


def one_run(pm: gb.ProcessManager, upstream_port: int, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start_gateway(pm, port, upstream_port)
    try:
        uvloop.run(measure(port, 2))  # warm-up
        idle = summary(uvloop.run(measure(port, args.seconds)))
        # The attack lasts the measurement plus one full deadline, so that every slow
        # connection opened before the measurement ends is cut once (and counted).
        result: Any = multiprocessing.Queue()
        hold = 2 + args.seconds + max(HEADER_TIMEOUT, BODY_TIMEOUT) + 3
        attacker = multiprocessing.Process(
            target=attacker_main, args=(port, args.connections, hold, result)
        )
        attacker.start()
        os.sched_setaffinity(attacker.pid, {int(gb.AUX_CORE)})  # type: ignore[arg-type]
        time.sleep(2)  # every slow connection open
        held = open_connections(proc.popen.pid)
        loaded = summary(uvloop.run(measure(port, args.seconds)))
        lifetimes = result.get(timeout=hold + 30)
        attacker.join(10)
    finally:
        pm.stop(proc)
    cut: dict[str, Any] = {}
    for kind in ("headers", "body"):
        lives = sorted(life for k, life in lifetimes if k == kind)
        cut[kind] = {
            "cut": len(lives),
            "min_s": round(lives[0], 2) if lives else None,
            "p50_s": round(statistics.median(lives), 2) if lives else None,
            "max_s": round(lives[-1], 2) if lives else None,
        }
    return {
        "idle": idle,
        "attack": loaded,
        "p50_ratio": round(loaded["p50_ms"] / idle["p50_ms"], 2),
        "gateway_connections_during_attack": held,
        "cut": cut,
    }


def open_connections(pid: int) -> int:
    """Sockets the gateway process holds (its descriptors that are sockets)."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    raise_nofile(args.connections * 2 + 1024)
    OUT.mkdir(parents=True, exist_ok=True)
    gb.OUT = OUT
    gb.NGINX_PORT = free_port()
    pm = gb.ProcessManager()
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gb.start_nginx(pm, Path(tmp), {})
            for i in range(args.repeat):
                run = one_run(pm, gb.NGINX_PORT, args)
                runs.append(run)
                print(json.dumps({"run": i + 1, **run}), flush=True)
    finally:
        pm.stop_all()
    (OUT / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(
        "run  idle p50/p99 ms   attack p50/p99 ms  ratio  held  cut headers (min/p50/max s)"
        "  cut body (min/p50/max s)"
    )
    for i, r in enumerate(runs, 1):
        h, b = r["cut"]["headers"], r["cut"]["body"]
        print(
            f"{i:>3}  {r['idle']['p50_ms']:>6.3f}/{r['idle']['p99_ms']:<7.3f}"
            f"  {r['attack']['p50_ms']:>6.3f}/{r['attack']['p99_ms']:<9.3f}"
            f"  {r['p50_ratio']:>5.2f}  {r['gateway_connections_during_attack']:>4}"
            f"  {h['cut']:>5} ({h['min_s']}/{h['p50_s']}/{h['max_s']})"
            f"  {b['cut']:>5} ({b['min_s']}/{b['p50_s']}/{b['max_s']})"
        )


if __name__ == "__main__":
    main()
