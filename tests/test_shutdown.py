"""SIGTERM: readiness false, in-flight streams finish within the bound, exit 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import GatewayProcess, config_for

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def stream_in_background(url: str, body: dict[str, object]) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []

    def consume() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                lines.extend(line for line in r.iter_lines() if line)
        except httpx.HTTPError as exc:
            lines.append(f"transport error: {type(exc).__name__}")

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 5
    while not any("tok0" in line for line in lines):
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.01)
    return thread, lines


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_then_exits_zero(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = config_for(upstream.url)
    config["server"] = {"drain_delay": 0.5, "drain_timeout": 10}
    gateway = GatewayProcess(config, tmp_path).start()
    assert gateway.process is not None
    try:
        body = {**CHAT, "mock": {"tokens_per_second": 10, "completion_tokens": 15}}
        thread, lines = stream_in_background(gateway.url, body)
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # Readiness is false at once, while requests that still arrive are served.
        assert httpx.get(f"{gateway.url}/readyz").status_code == 503
        late = httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "stream": False})
        assert late.status_code == 200
        # After the delay the socket closes: no new connections.
        time.sleep(0.8)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gateway.url}/healthz")
        assert gateway.process.wait(15) == 0
        thread.join(5)
    finally:
        gateway.stop()
    # The stream that was in flight finished whole.
    assert lines[-1] == "data: [DONE]"
    assert sum('"content":"tok' in line for line in lines) == 15


@pytest.mark.slow
def test_drain_timeout_bounds_the_wait(upstream: MockUpstream, tmp_path: Path) -> None:
    config = config_for(upstream.url)
    config["server"] = {"drain_timeout": 1}
    gateway = GatewayProcess(config, tmp_path).start()
    assert gateway.process is not None
    try:
        # A stream that would last 30 s.
        body = {**CHAT, "mock": {"tokens_per_second": 2, "completion_tokens": 60}}
        thread, lines = stream_in_background(gateway.url, body)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(10) == 0
        assert time.monotonic() - started < 4
        thread.join(5)
    finally:
        gateway.stop()
    assert "data: [DONE]" not in lines  # it was cut, not completed


@pytest.mark.slow
def test_a_second_ctrl_c_skips_the_delay_but_still_drains(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    """The second signal hands over to uvicorn at once; the first one's timer must not
    reach it later as a third (for SIGINT: a force-quit that cuts the streams and skips
    the lifespan's shutdown)."""
    config = config_for(upstream.url)
    config["server"] = {"drain_delay": 1.5, "drain_timeout": 10}
    gateway = GatewayProcess(config, tmp_path).start()
    assert gateway.process is not None
    try:
        # A stream lasting about 3 s: past the first signal's delay.
        body = {**CHAT, "mock": {"tokens_per_second": 10, "completion_tokens": 30}}
        thread, lines = stream_in_background(gateway.url, body)
        gateway.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        gateway.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # the second skipped the delay
            httpx.get(f"{gateway.url}/healthz")
        assert gateway.process.wait(15) == 0
        thread.join(5)
    finally:
        gateway.stop()
    assert lines[-1] == "data: [DONE]"
    assert sum('"content":"tok' in line for line in lines) == 30
    assert "Application shutdown complete" in gateway.log()
