"""Cases a hostile review found: a body the cache cannot read, numbers past 64 bits,
tool calls and fallbacks, leaders that leave or fail while followers wait, Redis failing,
and the semantic index's bound within one scope."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sluice.cache.answer import Answer, traits
from sluice.cache.key import request_key
from sluice.cache.metrics import CacheMetrics
from sluice.cache.semantic import Remember, SemanticCache
from sluice.cache.settings import SemanticSettings
from sluice.cache.tiers import AnswerStore, Location, MemoryTier, RedisTier
from sluice.settings import ConfigError, load_settings
from sluice.testing.mock_upstream import MockUpstream
from tests.cache.test_gateway_cache import ask, cached_config, chat, herd
from tests.gateway import config_for, running_gateway


class RawUpstream:
    """An OpenAI-shaped upstream that answers chat with whatever body the test sets."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.calls = 0
        self.delay = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    async def _chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return web.Response(body=self.body, content_type="application/json")

    def __enter__(self) -> RawUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def test_a_body_the_cache_cannot_read_is_passed_on_and_strands_nobody() -> None:
    with RawUpstream() as upstream:
        upstream.body = b'{"choices":[{"logprobs":{"content":[{"logprob":-Infinity}]}}]}'
        with running_gateway(cached_config(MockUpstreamStub(upstream.url))) as url:
            first = ask(url)
            assert first.status_code == 200
            assert first.content == upstream.body  # relayed as the upstream sent it
            again = httpx.post(f"{url}/chat/completions", json=chat("hi"), timeout=5)
            assert again.headers["x-sluice-cache"] == "miss"  # not stored, not stuck
            assert upstream.calls == 2


class MockUpstreamStub:
    """`cached_config` wants something with a ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_numbers_past_64_bits_are_keyed_not_refused() -> None:
    schema = {"type": "function", "function": {"name": "f", "parameters": {"maximum": 1e21}}}
    for body in ({"tools": [schema]}, {"x_vendor": 1e300}, {"x_vendor": -(2.0**70)}):
        assert request_key("key:a", "chat/completions", "m", body)
    assert request_key("key:a", "chat/completions", "m", {"x": 1e21}) != request_key(
        "key:a", "chat/completions", "m", {"x": 1e22}
    )


def test_tool_calls_are_seen_whatever_the_finish_reason_says() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "tool_calls": [call]}
    body = b"\n " + orjson.dumps({"choices": [{"message": message, "finish_reason": "stop"}]})
    reasons, tools = traits(Answer(200, body, None, None, None, 0.0))
    assert (reasons, tools) == ({"stop"}, True)
    cut = Answer(200, b'  {"choices":[{"finish_reason":"length"}]}', None, None, None, 0.0)
    assert traits(cut) == ({"length"}, False)


@pytest.fixture
def two_models() -> Iterator[tuple[str, MockUpstream, MockUpstream]]:
    """premium (always 503) falls back to cheap."""
    with MockUpstream() as premium, MockUpstream() as cheap:
        premium.behaviour.status = 503
        config = config_for(premium.url)
        config["models"] = [
            {
                "name": "premium",
                "deployments": [{"provider": "openai", "api_base": premium.url}],
                "fallbacks": ["cheap"],
            },
            {"name": "cheap", "deployments": [{"provider": "openai", "api_base": cheap.url}]},
        ]
        config["cache"] = {"enabled": True}
        config["resilience"] = {"retries": {"attempts": 2}}
        with running_gateway(config) as url:
            yield url, premium, cheap


def test_a_fallbacks_answer_is_neither_stored_nor_handed_to_followers(
    two_models: tuple[str, MockUpstream, MockUpstream],
) -> None:
    url, _, cheap = two_models
    cheap.behaviour.latency_ms = 300
    body = {**chat("fallback"), "model": "premium"}
    replies = asyncio.run(herd(url, body, 5))
    assert {r.status_code for r in replies} == {200}
    assert all(r.headers["x-sluice-model"] == "cheap" for r in replies)
    assert all(r.headers["x-sluice-cache"] == "miss" for r in replies)
    assert ask(url, body).headers["x-sluice-cache"] == "miss"  # nothing stored


def test_a_non_stream_follower_keeps_the_stream_going_when_the_leader_leaves() -> None:
    with MockUpstream() as mock:
        mock.behaviour.tokens_per_second = 10
        with running_gateway(cached_config(mock)) as url:

            async def scenario() -> httpx.Response:
                body = chat("mixed", stream=True)
                async with httpx.AsyncClient(timeout=30) as client:
                    async with client.stream(
                        "POST", f"{url}/chat/completions", json=body
                    ) as leader:
                        follower = asyncio.create_task(
                            client.post(f"{url}/chat/completions", json={**body, "stream": False})
                        )
                        await asyncio.sleep(0.2)
                        await anext(leader.aiter_bytes())
                    return await follower  # the leader's client is gone

            reply = asyncio.run(scenario())
            assert reply.status_code == 200
            assert reply.headers["x-sluice-cache"] == "coalesced"
            assert reply.json()["choices"][0]["message"]["content"].startswith("tok0 ")
            assert mock.stats.requests == 1
            assert mock.stats.streams_cancelled == 0


def test_a_non_stream_leader_that_leaves_still_answers_its_followers() -> None:
    with MockUpstream() as mock:
        mock.behaviour.latency_ms = 400
        with running_gateway(cached_config(mock)) as url:

            async def scenario() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=30) as client:
                    leader = asyncio.create_task(
                        client.post(f"{url}/chat/completions", json=chat("leaves"))
                    )
                    await asyncio.sleep(0.1)
                    followers = asyncio.gather(
                        *(client.post(f"{url}/chat/completions", json=chat("leaves"))
                          for _ in range(3))
                    )  # fmt: skip
                    await asyncio.sleep(0.1)
                    leader.cancel()
                    return list(await followers)

            replies = asyncio.run(scenario())
            assert [r.headers["x-sluice-cache"] for r in replies] == ["coalesced"] * 3
            assert mock.stats.requests == 1


class FailingRedis:
    """A Redis whose every command fails, counting the attempts."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, name: str) -> bytes:
        import redis.asyncio as aioredis

        self.calls += 1
        raise aioredis.ConnectionError("down")


def test_a_failing_redis_tier_rests_instead_of_failing_every_miss() -> None:
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock, redis = Clock(), FailingRedis()
    tier = RedisTier(redis, rest=5.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(10):
        assert asyncio.run(tier.get("a")) is None
    assert redis.calls == 1  # one failure, then rest
    clock.now = 5.1
    assert asyncio.run(tier.get("a")) is None
    assert redis.calls == 2


def test_the_semantic_index_is_bounded_within_one_scope() -> None:
    def unit(angle: float) -> Any:
        return np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)

    store = AnswerStore(MemoryTier(1 << 20), None)
    settings = SemanticSettings(embedding_model="e", max_entries=100)
    index = SemanticCache(settings, None, store, CacheMetrics(CollectorRegistry()), None)  # type: ignore[arg-type]
    for i in range(1000):
        where = Location("ns", "m", f"k{i}")
        index.remember(Remember("one scope", f"q{i}", unit(i / 1000)), where, 60)
    assert index._entries <= 100
    assert len(index._scopes["one scope"]) <= 100


def test_the_second_check_may_be_off_only_with_cosine_alones_threshold(tmp_path: Any) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("cache: {semantic: {verify: false}}\n")
    with pytest.raises(ConfigError, match=r"0\.97"):
        load_settings(config)
    config.write_text("cache: {semantic: {verify: false, threshold: 0.97}}\n")
    assert load_settings(config).cache.semantic.threshold == 0.97
