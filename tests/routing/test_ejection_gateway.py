"""Outlier ejection through the real gateway: two upstream deployments of one model, one
of them failing, passive detection and active probes (`sluice.routing.health`)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sluice.testing.mock_upstream import MockBehaviour, MockUpstream
from tests.gateway import running_gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def good() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def bad() -> Iterator[MockUpstream]:
    with MockUpstream(MockBehaviour(status=500)) as mock:
        yield mock


def two_deployments(good: MockUpstream, bad: MockUpstream, **health: Any) -> dict[str, Any]:
    def spec(upstream: MockUpstream, name: str) -> dict[str, Any]:
        return {"provider": "openai", "id": name, "api_base": upstream.url, "model": "mock"}

    return {
        "logging": {"level": "warning", "access_log": False},
        "usage": {"enabled": False},
        "models": [{"name": "chat", "deployments": [spec(good, "good"), spec(bad, "bad")]}],
        "resilience": {"health": {"ejection_base": 120, **health}},
    }


def metric(base: str, name: str, **labels: str) -> float | None:
    text = httpx.get(base.removesuffix("/v1") + "/metrics").text
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return None


def wait_for_metric(base: str, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 5
    while metric(base, name, **labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.05)


def chat_calls(upstream: MockUpstream) -> int:
    return upstream.stats.by_route.get("chat/completions", 0)


def test_a_failing_deployment_is_ejected_and_traffic_moves(
    good: MockUpstream, bad: MockUpstream
) -> None:
    config = two_deployments(good, bad, consecutive_failures=3, min_requests=100)
    with running_gateway(config) as base, httpx.Client(timeout=10) as client:
        statuses = [
            client.post(f"{base}/chat/completions", json=CHAT).status_code for _ in range(40)
        ]
        # Exactly the failures in a row that eject it reached the bad deployment, each
        # retried at once on the good one, which served everything: no client saw them.
        assert chat_calls(bad) == 3
        assert chat_calls(good) == 40
        assert statuses.count(200) == 40
        labels = {"model": "chat", "deployment": "bad"}
        assert (
            metric(base, "sluice_deployment_ejections_total", **labels, reason="consecutive") == 1
        )
        wait_for_metric(base, "sluice_deployment_ejected", 1.0, **labels)
        assert metric(base, "sluice_deployment_ejected", model="chat", deployment="good") == 0


def test_active_probes_eject_a_failing_deployment_before_any_request(
    good: MockUpstream, bad: MockUpstream
) -> None:
    config = two_deployments(good, bad, consecutive_failures=2, probe_interval=0.05)
    with running_gateway(config) as base, httpx.Client(timeout=10) as client:
        labels = {"model": "chat", "deployment": "bad", "reason": "consecutive"}
        wait_for_metric(base, "sluice_deployment_ejections_total", 1.0, **labels)
        assert good.stats.by_route.get("models", 0) >= 1  # the good one is probed too
        for _ in range(20):
            assert client.post(f"{base}/chat/completions", json=CHAT).status_code == 200
        assert chat_calls(bad) == 0
        assert chat_calls(good) == 20
