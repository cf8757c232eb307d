"""A rolling restart behind nginx fails no request (issue 21).

Two ``sluice serve`` replicas in front of the mock upstream, nginx in front of them with
deploy/compose/nginx.conf (its upstream addresses and port swapped for loopback ones), 32
clients posting chat completions through nginx, one in four streamed. Each replica in turn
gets SIGTERM, exits, starts again and becomes ready, while the load goes on. Every answer
must be a 200 and whole: a completion with all its tokens, a stream with all its chunks and
``data: [DONE]``.

Why each setting is there, and how many requests failed without it: the comments in
deploy/compose/nginx.conf (`rolling_restart` takes another nginx configuration and other
``server`` settings, to measure such a variant).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import GatewayProcess, config_for, free_port

NGINX_CONF = Path(__file__).parents[2] / "deploy" / "compose" / "nginx.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
SERVER = {"drain_delay": 2.0, "drain_timeout": 10.0}
"""The replicas' drain settings (drain_delay: see fail_timeout in nginx.conf)."""

CONCURRENCY = 32
MAX_REQUESTS = 50_000
CHAT_TOKENS = 4
STREAM_TOKENS = 8
CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "mock": {"latency_ms": 20, "completion_tokens": CHAT_TOKENS},
}
STREAM = {
    **CHAT,
    "stream": True,
    # 0.2 s streams: some are always under way when a replica is told to stop.
    "mock": {"tokens_per_second": 40, "completion_tokens": STREAM_TOKENS},
}


@dataclass
class Outcome:
    completed: int = 0
    streams: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    served_while_down: list[int] = field(default_factory=list)
    """Answers completed while each replica was stopped or starting."""
    exit_codes: list[int] = field(default_factory=list)
    retried: int = 0
    """Requests nginx sent to a second replica (its access log)."""


def render_nginx(template: str, upstreams: list[int], port: int, workdir: Path) -> Path:
    """The compose file's snippet with loopback addresses, inside a main configuration of
    its own (pid, logs and temporary files under ``workdir``); the main file's path."""
    swaps = {
        "server sluice-1:8080": f"server 127.0.0.1:{upstreams[0]}",
        "server sluice-2:8080": f"server 127.0.0.1:{upstreams[1]}",
        "listen 8080;": f"listen 127.0.0.1:{port};",
    }
    for old, new in swaps.items():
        assert template.count(old) == 1, f"deploy/compose/nginx.conf no longer has {old!r}"
        template = template.replace(old, new)
    (workdir / "sluice.conf").write_text(template)
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$status "$upstream_addr" "$upstream_status" $request_time';
    access_log {workdir}/access.log upstreams;
{temp}
    include {workdir}/sluice.conf;
}}
"""
    path = workdir / "nginx-main.conf"
    path.write_text(main)
    return path


@contextmanager
def running_nginx(config: Path, port: int) -> Iterator[str]:
    assert NGINX is not None
    workdir = config.parent
    log = (workdir / "nginx.out").open("wb")
    process = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (workdir / "error.log").read_text()
            try:
                httpx.get(f"{url}/healthz", timeout=0.5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


async def _one(session: aiohttp.ClientSession, url: str, stream: bool) -> str | None:
    """One request; what was wrong with its answer, or None."""
    async with session.post(f"{url}/v1/chat/completions", json=STREAM if stream else CHAT) as r:
        body = await r.read()
        if r.status != 200:
            return f"status {r.status}: {body[:120]!r}"
    if not stream:
        content = orjson.loads(body)["choices"][0]["message"]["content"]
        if content.split() != [f"tok{i}" for i in range(CHAT_TOKENS)]:
            return f"incomplete answer: {content!r}"
        return None
    events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream without [DONE] ({len(events)} events)"
    chunks = [orjson.loads(e) for e in events[:-1]]
    if any("error" in chunk for chunk in chunks):
        return "stream ended with an error event"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if text.split() != [f"tok{i}" for i in range(STREAM_TOKENS)]:
        return f"incomplete stream: {text!r}"
    return None


async def _load(url: str, stop: threading.Event, outcome: Outcome) -> None:
    numbers = itertools.count()
    timeout = aiohttp.ClientTimeout(total=20)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while not stop.is_set():
                n = next(numbers)
                if n >= MAX_REQUESTS:
                    return
                stream = n % 4 == 0
                try:
                    problem = await _one(session, url, stream)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is None:
                    outcome.completed += 1
                    outcome.streams += stream
                else:
                    outcome.failures[problem] += 1

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


def _roll(replicas: list[GatewayProcess], outcome: Outcome, stop: threading.Event) -> None:
    """SIGTERM each replica in turn, wait for it to exit, start it again, wait for /readyz;
    then stop the load."""
    try:
        time.sleep(1.5)  # the load reaches both replicas first
        for n, replica in enumerate(replicas):
            before = outcome.completed
            outcome.exit_codes.append(replica.terminate(timeout=30))
            replica.stop()  # (closes its log)
            replica.log_path = replica.log_path.with_name(f"sluice-restarted-{n}.log")
            replica.start(timeout=30)
            outcome.served_while_down.append(outcome.completed - before)
            # The next one at once, as a rollout does once the last is ready.
    finally:
        stop.set()


def rolling_restart(
    upstream: MockUpstream,
    tmp_path: Path,
    nginx_conf: str | None = None,
    server: dict[str, Any] | None = None,
) -> Outcome:
    """Run the whole scenario (``nginx_conf`` and ``server`` default to the compose file's
    and `SERVER`) and report what the clients saw."""
    config = {**config_for(upstream.url), "server": server if server is not None else SERVER}
    config["logging"] = {"level": "warning"}
    replicas: list[GatewayProcess] = []
    outcome = Outcome()
    try:
        for n in range(2):
            folder = tmp_path / f"replica{n}"
            folder.mkdir()
            replicas.append(GatewayProcess(config, folder))
        for replica in replicas:
            replica.start(timeout=30)
        workdir = tmp_path / "nginx"
        workdir.mkdir()
        port = free_port()
        template = nginx_conf if nginx_conf is not None else NGINX_CONF.read_text()
        main = render_nginx(template, [r.port for r in replicas], port, workdir)
        with running_nginx(main, port) as url:
            stop = threading.Event()
            roller = threading.Thread(target=_roll, args=(replicas, outcome, stop))
            roller.start()
            try:
                asyncio.run(asyncio.wait_for(_load(url, stop, outcome), timeout=60))
            finally:
                stop.set()
                roller.join(60)
        for line in (workdir / "access.log").read_text().splitlines():
            outcome.retried += ", " in line.split('"')[3]  # '502, 200': a second replica
    finally:
        for replica in replicas:
            replica.stop()
    return outcome


@pytest.mark.slow
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx-light)")
def test_rolling_restart_behind_nginx_fails_no_request(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    outcome = rolling_restart(upstream, tmp_path)
    assert outcome.exit_codes == [0, 0]
    assert not outcome.failures, (dict(outcome.failures), outcome)
    # The load went on through each restart, streams included.
    assert all(served > 0 for served in outcome.served_while_down), outcome
    assert outcome.streams > 0


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx-light)")
def test_the_compose_nginx_conf_is_valid(tmp_path: Path) -> None:
    """`nginx -t` on the file with loopback addresses (the names resolve only in compose)."""
    assert NGINX is not None
    main = render_nginx(NGINX_CONF.read_text(), [free_port(), free_port()], free_port(), tmp_path)
    check = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
