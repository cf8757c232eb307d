"""The sluice command line, run as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, free_port

ROOT = Path(__file__).resolve().parents[1]


def sluice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_check_config_prints_the_model_table() -> None:
    result = sluice(
        "check-config",
        str(ROOT / "examples/mock-upstream.yaml"),
        env={"UPSTREAM_KEY": "sk-hidden-value"},
    )
    assert result.returncode == 0, result.stderr
    assert "gpt-4o-mini/0" in result.stdout
    assert "http://127.0.0.1:9100/v1" in result.stdout
    assert "configuration OK" in result.stdout
    assert "sk-hidden-value" not in result.stdout


def test_check_config_fails_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"models": [{"name": "m", "deployments": [{"provider": "openai"}]}]})
    )
    result = sluice("check-config", str(bad))
    assert result.returncode == 1
    assert "api_base" in result.stderr
    assert "Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_missing_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if k != "UPSTREAM_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "check-config", str(ROOT / "examples/mock-upstream.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert "UPSTREAM_KEY" in result.stderr


@pytest.mark.slow
def test_several_workers_share_one_port_and_one_metrics_view(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text(yaml.safe_dump(config_for(upstream.url)))
    port = free_port()
    log = (tmp_path / "log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluice",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": "sk-upstream-secret"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        for _ in range(20):
            # A new connection each time, so both workers take some.
            assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sluice_requests_total{")
            and 'status="200"' in line
            and "chat/completions" in line
        )
        assert total == 20
    finally:
        process.terminate()
        assert process.wait(20) == 0
        log.close()
