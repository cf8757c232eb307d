"""Request ids, metrics and the access log."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import GatewayProcess, config_for

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_client_request_id_is_echoed_but_the_upstream_gets_the_servers(
    gateway: str, upstream: MockUpstream
) -> None:
    # The client's id is for correlation; the id that keys records and slots (and goes
    # upstream) is made by the server, fresh for every request, whatever the client sends.
    seen = set()
    for _ in range(2):
        response = httpx.post(
            f"{gateway}/chat/completions", json=CHAT, headers={"X-Request-ID": "trace-42.a"}
        )
        assert response.headers["x-request-id"] == "trace-42.a"
        seen.add(upstream.stats.last_headers["x-request-id"])
    assert len(seen) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in seen)


def test_request_id_is_generated_when_absent_or_malformed(
    gateway: str, upstream: MockUpstream
) -> None:
    for headers in ({}, {"X-Request-ID": "bad id with spaces"}):
        response = httpx.post(f"{gateway}/chat/completions", json=CHAT, headers=headers)
        generated = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)
        assert upstream.stats.last_headers["x-request-id"] == generated


def test_upstream_gets_its_own_key_never_the_clients(gateway: str, upstream: MockUpstream) -> None:
    httpx.post(
        f"{gateway}/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-client-1"}
    )
    assert upstream.stats.last_headers["authorization"] == "Bearer sk-upstream-secret"


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not found")


def test_metrics(gateway: str) -> None:
    base = gateway.removesuffix("/v1")
    before = httpx.get(f"{base}/metrics").text
    httpx.post(f"{gateway}/chat/completions", json=CHAT)
    httpx.post(f"{gateway}/chat/completions", json={**CHAT, "mock": {"status": 503}})
    stream = {**CHAT, "stream": True}
    httpx.post(f"{gateway}/chat/completions", json=stream)
    text = httpx.get(f"{base}/metrics").text

    def grew(name: str, by: float, **labels: str) -> None:
        try:
            old = metric(before, name, **labels)
        except AssertionError:
            old = 0.0
        assert metric(text, name, **labels) - old == by, name

    grew("sluice_requests_total", 2, model="gpt-4o-mini", route="chat/completions", status="200")
    grew("sluice_requests_total", 1, model="gpt-4o-mini", route="chat/completions", status="503")
    grew("sluice_request_duration_seconds_count", 3, model="gpt-4o-mini")
    grew("sluice_upstream_duration_seconds_count", 3, deployment="gpt-4o-mini/0")
    grew("sluice_gateway_overhead_seconds_count", 3, route="chat/completions")
    grew("sluice_time_to_first_token_seconds_count", 1, model="gpt-4o-mini")
    grew("sluice_tokens_total", 16, model="gpt-4o-mini", kind="completion")
    # The 503 was retried (resilience.retries.attempts = 3): each call failed and is counted.
    grew("sluice_upstream_errors_total", 3, kind="upstream_http_5xx")
    grew("sluice_retries_total", 2, deployment="gpt-4o-mini/0", reason="upstream_http_5xx")
    grew("sluice_upstream_attempts_count", 1)
    # The request's own error, once, by the kind that says where it came from.
    grew("sluice_request_errors_total", 1, model="gpt-4o-mini", kind="upstream_http_5xx")
    assert metric(text, "sluice_in_flight_requests") == 1.0  # the /metrics request itself


def test_health_endpoints(gateway: str) -> None:
    base = gateway.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}


def test_access_log_is_json_with_fields_and_no_secrets(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    gateway = GatewayProcess(config_for(upstream.url), tmp_path).start()
    try:
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={**CHAT, "max_tokens": 3},
            headers={"Authorization": "Bearer sk-client-very-secret", "X-Request-ID": "log-1"},
        )
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={**CHAT, "mock": {"reset": True}},
            headers={"api-key": "sk-client-very-secret"},
        )
    finally:
        gateway.stop()
    lines = [orjson.loads(line) for line in gateway.log().splitlines() if line.strip()]
    access = [entry for entry in lines if entry["logger"] == "sluice.access"]
    first = next(entry for entry in access if entry.get("client_request_id") == "log-1")
    assert re.fullmatch(r"[0-9a-f]{32}", first["request_id"])
    assert first["status"] == 200
    assert first["model"] == "gpt-4o-mini"
    assert first["completion_tokens"] == 3
    assert first["latency_ms"] > 0
    # Every call was reset: the deployment is down (503), and the log says why.
    assert any(entry["status"] == 503 and entry["error"] == "upstream_connect" for entry in access)
    everything = gateway.log()
    assert "very-secret" not in everything
    assert "sk-upstream-secret" not in everything
