"""Concurrent embedding requests to one upstream become one call; each caller gets its own."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.embedding_batch import EmbeddingBatcher
from sluice.errors import UpstreamConnectError, UpstreamStatusError
from sluice.settings import EmbeddingBatchSettings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway


class FakeUpstream:
    """Embeds each input as [len(input)]; refuses a batch containing "bad" with a 400."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[list[Any]] = []
        self.fail_with = fail_with

    async def __call__(self, call: UpstreamCall) -> UpstreamReply:
        inputs = call.body["input"]
        inputs = [inputs] if isinstance(inputs, str) else inputs
        self.calls.append(inputs)
        await asyncio.sleep(0.01)
        if self.fail_with is not None:
            raise self.fail_with
        if "bad" in inputs:
            raise UpstreamStatusError(400, b'{"error": {"message": "bad input"}}')
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(x))]}
            for i, x in enumerate(inputs)
        ]
        usage = {"prompt_tokens": 10 * len(inputs), "total_tokens": 10 * len(inputs)}
        body = {"object": "list", "data": data, "model": "m", "usage": usage}
        return UpstreamReply(200, orjson.dumps(body))


def call(inputs: Any, **options: Any) -> UpstreamCall:
    body = {"model": "m", "input": inputs, **options}
    return UpstreamCall("embeddings", body, None, request_id="r")


def vectors(reply: UpstreamReply) -> list[list[float]]:
    body = orjson.loads(reply.body)
    assert [item["index"] for item in body["data"]] == list(range(len(body["data"])))
    return [item["embedding"] for item in body["data"]]


async def test_concurrent_requests_share_one_upstream_call() -> None:
    upstream = FakeUpstream()
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_batch_size=64, max_wait_ms=20))
    texts = [["a"], ["bb", "ccc"], "dddd", ["eeeee"] * 3]
    replies = await asyncio.gather(*(batcher.send(call(t)) for t in texts))
    assert len(upstream.calls) == 1
    assert vectors(replies[0]) == [[1.0]]
    assert vectors(replies[1]) == [[2.0], [3.0]]
    assert vectors(replies[2]) == [[4.0]]
    assert vectors(replies[3]) == [[5.0]] * 3
    tokens = [orjson.loads(r.body)["usage"]["prompt_tokens"] for r in replies]
    assert sum(tokens) == 70  # the upstream's total, shared out exactly
    await batcher.close()


async def test_options_that_differ_are_not_merged() -> None:
    upstream = FakeUpstream()
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_wait_ms=20))
    await asyncio.gather(
        batcher.send(call("a", dimensions=8)), batcher.send(call("b", dimensions=16))
    )
    assert len(upstream.calls) == 2
    await batcher.close()


async def test_batch_size_caps_inputs_per_call() -> None:
    upstream = FakeUpstream()
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_batch_size=4, max_wait_ms=20))
    await asyncio.gather(*(batcher.send(call(["x", "y"])) for _ in range(4)))
    assert [len(c) for c in upstream.calls] == [4, 4]
    await batcher.close()


async def test_a_rejected_batch_is_retried_so_only_the_bad_request_fails() -> None:
    upstream = FakeUpstream()
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_wait_ms=20))
    results = await asyncio.gather(
        batcher.send(call("good")), batcher.send(call("bad")), return_exceptions=True
    )
    assert isinstance(results[0], UpstreamReply)
    assert vectors(results[0]) == [[4.0]]
    assert isinstance(results[1], UpstreamStatusError)
    await batcher.close()


async def test_an_upstream_failure_reaches_every_caller() -> None:
    upstream = FakeUpstream(fail_with=UpstreamConnectError("down"))
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_wait_ms=20))
    results = await asyncio.gather(
        batcher.send(call("a")), batcher.send(call("b")), return_exceptions=True
    )
    assert all(isinstance(r, UpstreamConnectError) for r in results)
    await batcher.close()


async def test_a_caller_that_leaves_does_not_disturb_the_others() -> None:
    upstream = FakeUpstream()
    batcher = EmbeddingBatcher(upstream, EmbeddingBatchSettings(max_wait_ms=50))
    leaving = asyncio.create_task(batcher.send(call("gone")))
    staying = asyncio.create_task(batcher.send(call("here")))
    await asyncio.sleep(0.01)
    leaving.cancel()
    assert vectors(await staying) == [[4.0]]
    assert upstream.calls == [["here"]]
    await batcher.close()


@pytest.fixture(scope="module")
def batching_gateway(upstream: MockUpstream) -> Any:
    config = config_for(upstream.url)
    config["models"][1]["deployments"][0]["batch_embeddings"] = {
        "max_batch_size": 64,
        "max_wait_ms": 30,
    }
    with running_gateway(config) as url:
        yield url


async def test_through_the_gateway_one_upstream_call_many_callers(
    batching_gateway: str, upstream: MockUpstream
) -> None:
    texts = [f"sentence number {i}" for i in range(16)]
    async with httpx.AsyncClient(base_url=batching_gateway, timeout=10) as client:
        direct = [
            (
                await client.post(f"{upstream.url}/embeddings", json={"model": "x", "input": t})
            ).json()["data"][0]["embedding"]
            for t in texts
        ]
        before = upstream.stats.embedding_calls
        responses = await asyncio.gather(
            *(
                client.post("/embeddings", json={"model": "text-embedding-3-small", "input": t})
                for t in texts
            )
        )
    assert upstream.stats.embedding_calls - before <= 2
    for response, expected in zip(responses, direct, strict=True):
        assert response.status_code == 200
        assert response.json()["data"][0]["embedding"] == expected
        assert response.json()["data"][0]["index"] == 0
