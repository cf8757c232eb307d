"""The cache through a running gateway: results, controls, stream shapes, coalescing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


def cached_config(upstream: MockUpstream, **cache: Any) -> dict[str, Any]:
    config = config_for(upstream.url)
    config["cache"] = {"enabled": True, **cache}
    config["resilience"] = {"retries": {"attempts": 1}}
    return config


@pytest.fixture
def gateway(mock: MockUpstream) -> Iterator[str]:
    with running_gateway(cached_config(mock)) as url:
        yield url


def ask(url: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=body or CHAT, headers=headers, timeout=10)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": content}], **extra}


def events(response: httpx.Response) -> list[Any]:
    """The SSE events' data, [DONE] as the string."""
    out: list[Any] = []
    for event in response.text.split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def test_a_deterministic_request_is_answered_once_then_from_the_cache(
    gateway: str, mock: MockUpstream
) -> None:
    first, second = ask(gateway), ask(gateway)
    assert first.headers["x-sluice-cache"] == "miss"
    assert second.headers["x-sluice-cache"] == "hit"
    assert second.content == first.content
    assert second.headers["x-sluice-model"] == "gpt-4o-mini"
    assert mock.stats.requests == 1


def test_a_request_that_is_not_deterministic_bypasses_it(gateway: str, mock: MockUpstream) -> None:
    body = chat("hi", temperature=0.7)
    assert [ask(gateway, body).headers["x-sluice-cache"] for _ in range(2)] == ["bypass"] * 2
    seeded = chat("hi", temperature=0.7, seed=1)
    assert [ask(gateway, seeded).headers["x-sluice-cache"] for _ in range(2)] == ["miss", "hit"]
    assert mock.stats.requests == 3


def test_controls(gateway: str, mock: MockUpstream) -> None:
    body = chat("controls")
    assert ask(gateway, body, **{"cache-control": "no-store"}).headers["x-sluice-cache"] == "miss"
    assert ask(gateway, body).headers["x-sluice-cache"] == "miss"  # nothing was stored
    assert ask(gateway, body, **{"cache-control": "no-cache"}).headers["x-sluice-cache"] == "miss"
    assert ask(gateway, body).headers["x-sluice-cache"] == "hit"
    assert ask(gateway, {**body, "cache": {"no-cache": True}}).headers["x-sluice-cache"] == "miss"
    assert mock.stats.requests == 4
    assert "cache" not in mock.stats.last_body  # the gateway's own field never goes upstream
    # max-age opts a request that is not deterministic in, and bounds the age it accepts.
    hot = chat("warm", temperature=1.0)
    assert ask(gateway, hot, **{"cache-control": "max-age=60"}).headers["x-sluice-cache"] == "miss"
    assert ask(gateway, hot, **{"cache-control": "max-age=60"}).headers["x-sluice-cache"] == "hit"
    assert ask(gateway, hot).headers["x-sluice-cache"] == "bypass"
    bad = ask(gateway, {**body, "cache": {"max-age": "soon"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "cache"


def test_max_age_is_the_oldest_answer_accepted(gateway: str, mock: MockUpstream) -> None:
    body = chat("aged")
    ask(gateway, body)
    import time

    time.sleep(1.1)
    assert ask(gateway, body, **{"cache-control": "max-age=1"}).headers["x-sluice-cache"] == "miss"
    assert ask(gateway, body, **{"cache-control": "max-age=5"}).headers["x-sluice-cache"] == "hit"


def test_a_ttl_expires_answers(mock: MockUpstream) -> None:
    import time

    with running_gateway(cached_config(mock, ttl=0.3)) as url:
        assert ask(url).headers["x-sluice-cache"] == "miss"
        assert ask(url).headers["x-sluice-cache"] == "hit"
        time.sleep(0.4)
        assert ask(url).headers["x-sluice-cache"] == "miss"


def test_truncated_answers_and_errors_are_not_stored(gateway: str, mock: MockUpstream) -> None:
    cut = chat("long", max_tokens=2)  # the mock writes 8 tokens: finish_reason "length"
    assert [ask(gateway, cut).headers["x-sluice-cache"] for _ in range(2)] == ["miss", "miss"]
    failing = chat("fails", mock={"status": 400})
    replies = [ask(gateway, failing) for _ in range(2)]
    assert [(r.status_code, r.headers["x-sluice-cache"]) for r in replies] == [(400, "miss")] * 2


def test_a_stored_stream_is_replayed_chunk_by_chunk_usage_last(
    gateway: str, mock: MockUpstream
) -> None:
    body = chat("stream me", stream=True, stream_options={"include_usage": True})
    live, replayed = ask(gateway, body), ask(gateway, body)
    assert (live.headers["x-sluice-cache"], replayed.headers["x-sluice-cache"]) == ("miss", "hit")
    assert replayed.headers["content-type"].startswith("text/event-stream")
    live_events, replayed_events = events(live), events(replayed)
    assert replayed_events == live_events
    contents = [e["choices"][0]["delta"].get("content") for e in replayed_events[1:-3]]
    assert contents == [f"tok{i} " for i in range(8)]  # one delta per chunk, as it came
    assert replayed_events[-2]["choices"] == []  # usage last, then [DONE]
    assert replayed_events[-2]["usage"]["completion_tokens"] == 8
    assert replayed_events[-1] == "[DONE]"
    without_usage = events(ask(gateway, {**body, "stream_options": None}))
    assert all(not (isinstance(e, dict) and e["choices"] == []) for e in without_usage)
    assert mock.stats.requests == 1


def test_each_form_serves_the_other(gateway: str, mock: MockUpstream) -> None:
    streamed = chat("as a stream", stream=True)
    ask(gateway, streamed)
    complete = ask(gateway, {**streamed, "stream": False})
    assert complete.headers["x-sluice-cache"] == "hit"
    message = complete.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "".join(f"tok{i} " for i in range(8))}
    assert complete.json()["usage"]["completion_tokens"] == 8

    whole = chat("as a body")
    ask(gateway, whole)
    stream = ask(gateway, {**whole, "stream": True})
    assert stream.headers["x-sluice-cache"] == "hit"
    chunks = events(stream)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == "".join(f"tok{i} " for i in range(8))
    assert len(chunks) > 8  # a delta per word, not one chunk holding everything
    assert mock.stats.requests == 2


def test_embeddings_are_cached(gateway: str, mock: MockUpstream) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    url = f"{gateway}/embeddings"
    first, second = httpx.post(url, json=body), httpx.post(url, json=body)
    assert (first.headers["x-sluice-cache"], second.headers["x-sluice-cache"]) == ("miss", "hit")
    assert first.content == second.content
    assert mock.stats.requests == 1


async def herd(url: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/chat/completions", json=body) for _ in range(count))
        )


def test_a_hundred_identical_requests_make_one_upstream_call(
    gateway: str, mock: MockUpstream
) -> None:
    mock.behaviour.latency_ms = 500
    replies = asyncio.run(herd(gateway, chat("herd"), 100))
    assert {r.status_code for r in replies} == {200}
    assert len({r.content for r in replies}) == 1
    kinds = Counter(r.headers["x-sluice-cache"] for r in replies)
    assert kinds["miss"] == 1, kinds
    assert kinds["coalesced"] >= 50, kinds
    assert mock.stats.requests == 1


def test_streams_fan_out_to_every_follower(gateway: str, mock: MockUpstream) -> None:
    mock.behaviour.tokens_per_second = 20  # about 0.4 s per stream
    body = chat("fan out", stream=True)
    replies = asyncio.run(herd(gateway, body, 20))
    assert mock.stats.requests == 1
    assert Counter(r.headers["x-sluice-cache"] for r in replies)["coalesced"] >= 10
    contents = {
        "".join(c["choices"][0]["delta"].get("content") or "" for c in events(r)[:-1])
        for r in replies
    }
    assert contents == {"".join(f"tok{i} " for i in range(8))}
    assert all(events(r)[-1] == "[DONE]" for r in replies)


async def _leader_fails_then(url: str, mock: MockUpstream) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        body = chat("leader fails")
        mock.behaviour.status, mock.behaviour.latency_ms = 503, 300
        leader = asyncio.create_task(client.post(f"{url}/chat/completions", json=body))
        await _until(lambda: mock.stats.requests > 0)
        mock.behaviour.status = 200  # the leader's call fails; the next one will not
        followers = [client.post(f"{url}/chat/completions", json=body) for _ in range(10)]
        return [await leader, *await asyncio.gather(*followers)]


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 (the mock's counters are not events)
        await asyncio.sleep(0.01)


def test_when_the_leader_fails_one_follower_retries(gateway: str, mock: MockUpstream) -> None:
    leader, *followers = asyncio.run(_leader_fails_then(gateway, mock))
    assert leader.status_code == 503
    assert {f.status_code for f in followers} == {200}
    assert Counter(f.headers["x-sluice-cache"] for f in followers) == {"miss": 1, "coalesced": 9}
    assert mock.stats.requests == 2


async def _leader_leaves(url: str) -> tuple[list[httpx.Response], bytes]:
    body = chat("leader leaves", stream=True)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", f"{url}/chat/completions", json=body) as leader:
            assert leader.headers["x-sluice-cache"] == "miss"
            followers = asyncio.gather(
                *(client.post(f"{url}/chat/completions", json=body) for _ in range(3))
            )
            await asyncio.sleep(0.1)
            first = await anext(leader.aiter_bytes())
        # The leader's client has gone, mid-stream.
        return await followers, first


def test_when_the_leader_leaves_the_stream_goes_on_for_the_followers(
    gateway: str, mock: MockUpstream
) -> None:
    mock.behaviour.tokens_per_second = 10
    followers, first = asyncio.run(_leader_leaves(gateway))
    assert first.startswith(b"data: ")
    for reply in followers:
        assert reply.headers["x-sluice-cache"] == "coalesced"
        assert events(reply)[-1] == "[DONE]"
    assert mock.stats.requests == 1
    assert mock.stats.streams_completed == 1
    assert mock.stats.streams_cancelled == 0
    # Whole: stored, so the next one is a hit.
    assert ask(gateway, chat("leader leaves", stream=True)).headers["x-sluice-cache"] == "hit"


def test_when_everyone_leaves_the_upstream_call_is_aborted(
    gateway: str, mock: MockUpstream
) -> None:
    mock.behaviour.tokens_per_second = 10

    async def leave() -> None:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "POST", f"{gateway}/chat/completions", json=chat("alone", stream=True)
            ) as reply,
        ):
            await anext(reply.aiter_bytes())

    asyncio.run(leave())
    import time

    deadline = time.monotonic() + 5
    while mock.stats.streams_cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock.stats.streams_cancelled == 1


def test_a_model_without_the_cache_is_untouched(mock: MockUpstream) -> None:
    config = cached_config(mock)
    config["cache"]["enabled"] = False
    config["models"][0]["cache"] = {"enabled": True, "ttl": 60}
    with running_gateway(config) as url:
        assert ask(url).headers["x-sluice-cache"] == "miss"
        body = {"model": "text-embedding-3-small", "input": "a"}
        reply = httpx.post(f"{url}/embeddings", json=body)
        assert "x-sluice-cache" not in reply.headers
