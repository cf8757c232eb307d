"""Test helpers: a real Sluice server on a loopback port, in a thread or a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from starlette.applications import Starlette

from sluice.app import build_app
from sluice.http_protocol import SluiceHttpProtocol
from sluice.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_for(upstream_url: str, **deployment: Any) -> dict[str, Any]:
    """A settings mapping with one chat model and one embedding model on ``upstream_url``."""
    spec = {
        "provider": "openai",
        "api_base": upstream_url,
        "api_key": "os.environ/SLUICE_TEST_UPSTREAM_KEY",
        **deployment,
    }
    return {
        "logging": {"level": "info", "access_log": True},
        "usage": {"enabled": False},
        "models": [
            {"name": "gpt-4o-mini", "deployments": [{**spec, "model": "mock-chat"}]},
            {"name": "text-embedding-3-small", "deployments": [spec]},
        ],
    }


@contextmanager
def running_gateway(
    config: dict[str, Any],
    prepare: Callable[[Starlette], None] | None = None,
    http: type[asyncio.Protocol] | str = SluiceHttpProtocol,
) -> Iterator[str]:
    """Serve ``config`` with uvicorn in a background thread; yield the base URL (…/v1).

    ``http`` is uvicorn's HTTP protocol: Sluice's own (as ``sluice serve`` runs) unless
    a test asks for uvicorn's ("httptools")."""
    os.environ.setdefault("SLUICE_TEST_UPSTREAM_KEY", "sk-upstream-secret")
    # A data directory of its own (files, the batch queue, usage), never the user's.
    with tempfile.TemporaryDirectory(prefix="sluice-test-") as data_dir:
        app = build_app(Settings(**{"data_dir": data_dir, **config}))
        if prepare is not None:
            prepare(app)
        with serving(app, http=http, timeout_graceful_shutdown=2) as port:
            yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def serving(app: Any, **options: Any) -> Iterator[int]:
    """Serve an ASGI app with uvicorn (``options`` are uvicorn.Config's) in a background
    thread on a free loopback port; yield the port."""
    port = free_port()
    defaults: dict[str, Any] = {"lifespan": "on", "access_log": False, "log_config": None}
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, **{**defaults, **options})
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # a lifespan that loads a model on a busy machine
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


class GatewayProcess:
    """``sluice serve`` as a real subprocess (for signals and CLI behaviour)."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.config_path = tmp_path / "sluice.yaml"
        config = {"data_dir": str(tmp_path / "data"), **config}
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "sluice.log"
        self._env = {**os.environ, "SLUICE_TEST_UPSTREAM_KEY": "sk-upstream-secret", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> GatewayProcess:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluice",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sluice exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sluice did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it (drains, writes its usage); the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
