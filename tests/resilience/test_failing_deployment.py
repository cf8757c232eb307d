"""One of a model's two deployments fails (errors, resets, stalls, slowness, 429 storms, a
stream that stops after its first byte) while the other serves: through the real gateway,
with the faults injected by the mock upstream (`sluice.testing.faults`)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from sluice.testing import MockUpstream
from tests.gateway import running_gateway
from tests.resilience.helpers import (
    FIRST_BYTE_TIMEOUT,
    MODEL,
    calls,
    chat,
    config,
    deployment,
    metric,
)

FAULTS: dict[str, dict[str, Any]] = {
    "errors": {"error_rate": 1.0, "error_status": 503},
    "resets": {"reset_rate": 1.0},
    "stalls-before-the-first-byte": {"stall_rate": 1.0, "stall_seconds": 5.0},
    "down": {"down": True},
}


@pytest.mark.parametrize("faults", FAULTS.values(), ids=list(FAULTS))
def test_a_failing_deployment_is_passed_over_then_ejected(
    a: MockUpstream, b: MockUpstream, client: httpx.Client, faults: dict[str, Any]
) -> None:
    a.set_faults(**faults)
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"))) as base:
        answers = [chat(client, base) for _ in range(30)]
        assert [x.status for x in answers] == [200] * 30
        assert {x.deployment for x in answers} == {"b"}
        assert {x.headers.get("x-sluice-model") for x in answers} == {MODEL}
        # Three failures in a row eject "a" (consecutive_failures); each cost the request
        # that met it one retry on "b", and nothing more.
        assert calls(a) == 3
        assert sum(a.stats.faults.values()) == 3
        assert sorted(x.attempts for x in answers) == [1] * 27 + [2] * 3
        assert calls(b) == 30
        labels = {"model": MODEL, "deployment": "a", "reason": "consecutive"}
        assert metric(base, "sluice_deployment_ejections_total", **labels) == 1


def test_a_stream_failing_before_its_first_byte_is_retried(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    a.set_faults(error_rate=1.0)
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"))) as base:
        answers = [chat(client, base, stream=True) for _ in range(10)]
    for answer in answers:
        assert answer.status == 200
        assert answer.deployment == "b"
        assert answer.events is not None
        assert answer.events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in answer.events)
    assert calls(a) >= 1
    assert calls(a) + calls(b) == 10 + calls(a)  # one retry for each failure, no more


def test_a_stall_after_the_first_byte_is_never_retried(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    """Once the client has bytes, another attempt would send it a second answer: the stream
    ends with an error event instead, after one upstream call."""
    for upstream in (a, b):
        upstream.set_faults(stream_stall_rate=1.0, stream_stall_seconds=5.0)
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"))) as base:
        answers = [chat(client, base, stream=True) for _ in range(3)]
    assert calls(a, b) == 3
    for answer in answers:
        assert answer.status == 200
        assert answer.attempts in (None, 1)
        assert answer.events is not None
        role, *rest = answer.events
        assert role["choices"][0]["delta"]["role"] == "assistant"
        assert rest[-1] == "[DONE]"
        assert rest[-2]["error"]["code"] == "upstream_read_timeout"
        assert FIRST_BYTE_TIMEOUT <= answer.seconds < 2.0


def test_a_slow_deployment_gets_little_traffic_with_latency_balancing(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    # Far slower than a cold first answer from "b" can be on a loaded machine (a CI run saw
    # "a" get a fourth call at 100 ms: "b"'s first, cold, answer looked slower than that).
    a.set_faults(added_latency_ms=400)
    settings = config(deployment(a, "a"), deployment(b, "b"), model={"balancing": "latency"})
    with running_gateway(settings) as base:
        answers = [chat(client, base) for _ in range(30)]
    assert [x.status for x in answers] == [200] * 30
    assert calls(a) <= 3  # its first answers show it slow; the fast one takes the rest


def test_slow_calls_eject_a_deployment(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    a.set_faults(added_latency_ms=150)
    health = {"slow_call_seconds": 0.1, "slow_rate": 0.5, "min_requests": 4}
    settings = config(
        deployment(a, "a"), deployment(b, "b"), model={"balancing": "weighted"}, health=health
    )
    with running_gateway(settings) as base:
        answers = [chat(client, base) for _ in range(40)]
        labels = {"model": MODEL, "deployment": "a", "reason": "slow_rate"}
        assert metric(base, "sluice_deployment_ejections_total", **labels) == 1
    assert [x.status for x in answers] == [200] * 40  # slow, never failed
    assert 4 <= calls(a) <= 6


def test_a_429_storm_cools_the_deployment_for_its_retry_after(
    a: MockUpstream, b: MockUpstream, client: httpx.Client
) -> None:
    a.set_faults(throttle_rate=1.0, retry_after=1.0)
    with running_gateway(config(deployment(a, "a"), deployment(b, "b"))) as base:
        # Well within the Retry-After: "a" is asked once, then left alone while it cools.
        answers = [chat(client, base) for _ in range(20)]
        assert [x.status for x in answers] == [200] * 20
        assert {x.deployment for x in answers} == {"b"}
        assert calls(a) == 1
        # Back-pressure is not a failure: "a" is not ejected.
        labels = {"model": MODEL, "deployment": "a", "reason": "consecutive"}
        assert not metric(base, "sluice_deployment_ejections_total", **labels)

        time.sleep(1.1)  # the Retry-After runs out
        for _ in range(20):
            assert chat(client, base).status == 200
            if calls(a) == 2:
                break
        assert calls(a) == 2, "after its Retry-After the deployment is asked again"

        # Every deployment throttled: the client is told to come back later, at once, and
        # the gateway does not wait out a Retry-After longer than its backoff.
        b.set_faults(throttle_rate=1.0, retry_after=1.0)
        before = calls(a, b)
        answer = chat(client, base)
        assert answer.status == 429
        assert answer.headers["retry-after"] == "1"
        assert answer.seconds < 0.5
        assert calls(a, b) - before <= 2
