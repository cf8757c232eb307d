"""Shadow traffic: copies go out beside the primary, are compared, and are never returned."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.errors import UpstreamConnectError, UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.plan import MakePlan
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.shadow import Shadow, ShadowLink, ShadowTraffic
from sluice.pipeline.steps import Reply
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.plan import ModelRoute
from sluice.routing.router import Router
from sluice.routing.settings import ShadowSettings
from sluice.routing.table import Table
from sluice.routing.versions import Alias
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import running_gateway


def answer(content: str, completion_tokens: int = 3) -> bytes:
    return orjson.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens},
        }
    )


class ShadowBackend:
    """Answers once released; remembers the calls."""

    name = "shadow"

    def __init__(self, body: bytes = b"", error: UpstreamError | None = None) -> None:
        self.body = body or answer("hello")
        self.error = error
        self.calls: list[UpstreamCall] = []
        self.release = asyncio.Event()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        self.calls.append(call)
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return UpstreamReply(200, self.body)

    def stream(self, call: UpstreamCall) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        raise AssertionError("a shadow copy is never streamed")


class Gateway:
    """MakePlan → Shadow → a primary that answers at once (or fails, or streams)."""

    def __init__(self, shadow: ShadowBackend, percent: float = 100, max_in_flight: int = 64):
        primary = Deployment("gpt-a/0", ShadowBackend(), "up-a", 1.0)  # never called
        self.shadow_deployment = Deployment("gpt-s/0", shadow, "up-s", 1.0)
        alias = Alias(
            "gpt", (("gpt-a", 1.0),), shadow=ShadowSettings(model="gpt-s", percent=percent)
        )
        routes = {
            "gpt-a": ModelRoute("gpt-a", [primary]),
            "gpt-s": ModelRoute("gpt-s", [self.shadow_deployment]),
        }
        self.table = Table(routes, {"gpt": alias})
        self.router = Router(self.table, seed=1)
        self.registry = CollectorRegistry()
        metrics = GatewayMetrics(self.registry)
        self.traffic = ShadowTraffic(self.router, metrics, max_in_flight=max_in_flight)
        self.plan = MakePlan(self.router, metrics)
        self.plan.next = self.primary
        self.link = ShadowLink(self.plan, Shadow(self.router, self.traffic, random.Random(5)))
        self.link.update(self.table)
        self.reply: Reply = UpstreamReply(200, answer("hello"))
        self.fail = False

    async def primary(self, ctx: RequestContext) -> Reply:
        ctx.upstream_seconds = 0.010
        if self.fail:
            raise UpstreamConnectError("down")
        if isinstance(self.reply, UpstreamReply):
            ctx.completion_tokens = 3
        return self.reply

    async def request(self, stream: bool = False) -> tuple[RequestContext, Reply]:
        body: dict[str, Any] = {"model": "gpt", "messages": [], "user": "u"}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        ctx = RequestContext(
            "req-1",
            time.perf_counter(),
            model="gpt",
            body=body,
            raw=orjson.dumps(body),
            upstream_route="chat/completions",
            stream=stream,
        )
        return ctx, await self.plan(ctx)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"alias": "gpt", **labels}) or 0.0

    async def settled(self) -> None:
        for _ in range(1000):
            if self.traffic.in_flight == 0:
                return
            await asyncio.sleep(0)
        raise AssertionError("the shadow copy never finished")


async def test_the_primary_answers_while_its_shadow_is_pending() -> None:
    shadow = ShadowBackend()
    gateway = Gateway(shadow)
    ctx, reply = await gateway.request()
    # The client has its answer; the copy is out, unanswered.
    assert isinstance(reply, UpstreamReply)
    assert reply.body == answer("hello")
    assert gateway.traffic.in_flight == 1
    await asyncio.sleep(0)
    [call] = shadow.calls
    assert call.body["model"] == "up-s"
    assert call.stream is False
    assert ctx.plan is not None
    assert ctx.plan.model == "gpt-a"
    shadow.release.set()
    await gateway.settled()
    assert gateway.metric("sluice_shadow_requests_total", outcome="sent") == 1
    assert gateway.metric("sluice_shadow_matches_total", result="match") == 1
    assert gateway.metric("sluice_shadow_latency_ratio_count") == 1
    assert gateway.metric("sluice_shadow_completion_tokens_total", side="shadow") == 3
    assert gateway.shadow_deployment.outstanding == 0  # begin and end, once each


async def test_a_different_shadow_answer_is_a_mismatch_and_never_returned() -> None:
    shadow = ShadowBackend(answer("something else", completion_tokens=9))
    shadow.release.set()
    gateway = Gateway(shadow)
    _, reply = await gateway.request()
    await gateway.settled()
    assert isinstance(reply, UpstreamReply)
    assert reply.body == answer("hello")
    assert gateway.metric("sluice_shadow_matches_total", result="mismatch") == 1
    assert gateway.metric("sluice_shadow_completion_tokens_total", side="shadow") == 9
    assert gateway.metric("sluice_shadow_completion_tokens_total", side="primary") == 3


async def test_copies_beyond_the_bound_are_dropped() -> None:
    gateway = Gateway(ShadowBackend(), max_in_flight=2)
    for _ in range(5):
        await gateway.request()
    assert gateway.traffic.in_flight == 2
    assert gateway.metric("sluice_shadow_requests_total", outcome="dropped") == 3
    await gateway.traffic.close()
    assert gateway.traffic.in_flight == 0


async def test_a_failed_shadow_is_counted_and_harmless() -> None:
    shadow = ShadowBackend(error=UpstreamConnectError("shadow down"))
    shadow.release.set()
    gateway = Gateway(shadow)
    _, reply = await gateway.request()
    await gateway.settled()
    assert isinstance(reply, UpstreamReply)
    assert gateway.metric("sluice_shadow_requests_total", outcome="failed") == 1
    assert gateway.metric("sluice_shadow_matches_total", result="match") == 0


async def test_a_failed_primary_is_not_compared() -> None:
    shadow = ShadowBackend()
    shadow.release.set()
    gateway = Gateway(shadow)
    gateway.fail = True
    with pytest.raises(UpstreamConnectError):
        await gateway.request()
    await gateway.settled()
    assert gateway.metric("sluice_shadow_requests_total", outcome="sent") == 1
    assert gateway.metric("sluice_shadow_latency_ratio_count") == 0


async def test_a_streamed_primary_is_compared_on_time_and_tokens_at_its_end() -> None:
    shadow = ShadowBackend()
    shadow.release.set()
    gateway = Gateway(shadow)

    async def no_events() -> AsyncIterator[bytes]:
        yield b"data: [DONE]\n\n"

    async def close() -> None: ...

    gateway.reply = StreamReply(no_events(), close)
    ctx, reply = await gateway.request(stream=True)
    assert isinstance(reply, StreamReply)
    await asyncio.sleep(0)
    [call] = shadow.calls
    assert call.body["stream"] is False
    assert "stream_options" not in call.body
    assert call.raw is None
    assert ctx.body["stream"] is True  # the client's body is untouched
    await asyncio.sleep(0.01)
    assert gateway.metric("sluice_shadow_latency_ratio_count") == 0  # the stream runs on
    ctx.completion_tokens = 4
    assert ctx.at_end is not None
    for finish in ctx.at_end:  # what the HTTP layer does after the last event
        finish(ctx)
    await gateway.settled()
    assert gateway.metric("sluice_shadow_latency_ratio_count") == 1
    assert gateway.metric("sluice_shadow_completion_tokens_total", side="primary") == 4
    assert gateway.metric("sluice_shadow_matches_total", result="match") == 0


async def test_the_percentage_mirrors_that_share() -> None:
    shadow = ShadowBackend()
    shadow.release.set()
    gateway = Gateway(shadow, percent=25)
    for _ in range(2000):
        await gateway.request()
        await gateway.settled()
    assert 400 <= len(shadow.calls) <= 600


async def test_the_step_is_linked_only_while_some_alias_has_a_shadow() -> None:
    gateway = Gateway(ShadowBackend())
    shadow_step = gateway.plan.next
    assert isinstance(shadow_step, Shadow)
    without = Table(gateway.table.routes, {"gpt": Alias("gpt", (("gpt-a", 1.0),))})
    gateway.link.update(without)
    assert gateway.plan.next == gateway.primary
    gateway.link.update(gateway.table)
    assert gateway.plan.next is shadow_step
    assert shadow_step.next == gateway.primary


def test_through_the_gateway_a_slow_shadow_never_delays_the_answer(
    upstream: MockUpstream,
) -> None:
    spec = {"provider": "openai", "api_base": upstream.url}
    config = {
        "usage": {"enabled": False},
        "models": [
            {"name": "gpt-a", "deployments": [{**spec, "model": "mock-a"}]},
            {
                "name": "gpt-s",
                "deployments": [
                    {**spec, "model": "mock-s", "headers": {"x-mock-latency-ms": "1500"}}
                ],
            },
        ],
        "aliases": [
            {
                "name": "gpt",
                "versions": [{"model": "gpt-a", "weight": 1}],
                "shadow": {"model": "gpt-s", "percent": 100},
            }
        ],
    }
    apps: list[Any] = []
    with running_gateway(config, prepare=apps.append) as url:
        shadows: ShadowTraffic = apps[0].state.shadows
        started = time.monotonic()
        body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.json()["model"] == "mock-a"  # the primary's answer, never the shadow's
        assert elapsed < 1.0
        assert shadows.in_flight == 1  # the copy is still waiting on its slow upstream
        deadline = time.monotonic() + 10
        while shadows.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'sluice_shadow_matches_total{alias="gpt",result="match"} 1.0' in metrics
        assert 'sluice_alias_choices_total{alias="gpt",version="gpt-a"} 1.0' in metrics


async def test_a_copy_cancelled_at_shutdown_judges_nothing() -> None:
    ends: list[Outcome] = []

    class Judged(Deployment):
        def end(self, outcome: Outcome, *args: Any) -> None:
            super().end(outcome, *args)
            ends.append(outcome)

    gateway = Gateway(ShadowBackend())
    judged = Judged("gpt-s/0", gateway.shadow_deployment.backend, "up-s", 1.0)
    gateway.table.routes["gpt-s"] = ModelRoute("gpt-s", [judged])
    await gateway.request()
    await asyncio.sleep(0)
    assert gateway.traffic.in_flight == 1
    await gateway.traffic.close()
    # The shadow deployment did not fail: the gateway stopped waiting for it.
    assert ends == [Outcome.NO_VERDICT]
    assert judged.outstanding == 0
