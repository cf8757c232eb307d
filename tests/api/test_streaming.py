"""SSE relay: unbuffered, [DONE]-terminated, usage-aware, cancelled with the client."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import orjson

from sluice.testing.mock_upstream import MockUpstream

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def data_events(gateway: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_stream_headers(gateway: str) -> None:
    with httpx.stream("POST", f"{gateway}/chat/completions", json=CHAT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        response.read()


def test_chunks_are_relayed_as_they_arrive(gateway: str) -> None:
    # 10 tokens at 10 tokens/s: the stream lasts about a second.
    body = {**CHAT, "mock": {"tokens_per_second": 10, "completion_tokens": 10}}
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{gateway}/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"tok' in line:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 10
    assert arrivals[0] < 0.4  # first token long before the stream ends
    assert arrivals[-1] > 0.8
    # Tokens trickle in one by one rather than in a burst at the end.
    assert arrivals[5] - arrivals[0] > 0.35


def test_stream_ends_with_done_and_honours_include_usage(gateway: str) -> None:
    events = data_events(gateway, {**CHAT, "stream_options": {"include_usage": True}})
    assert events[-1] == "data: [DONE]"
    usage_chunk = orjson.loads(events[-2].removeprefix("data: "))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8


def test_usage_chunk_requested_by_the_gateway_is_not_shown(
    gateway: str, upstream: MockUpstream
) -> None:
    events = data_events(gateway, CHAT)
    # The gateway asked the upstream for usage, for its own accounting ...
    assert upstream.stats.last_body["stream_options"] == {"include_usage": True}
    # ... and the client, which did not, never sees it.
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks)
    assert events[-1] == "data: [DONE]"


def test_mid_stream_failure_ends_with_an_error_event(gateway: str) -> None:
    events = data_events(gateway, {**CHAT, "mock": {"fail_after_chunks": 3}})
    contents = [e for e in events if '"content":"tok' in e]
    assert len(contents) == 3
    assert events[-1] == "data: [DONE]"
    error = orjson.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_reset"


def test_client_disconnect_cancels_the_upstream_at_once(
    gateway: str, upstream: MockUpstream
) -> None:
    before = upstream.stats.streams_cancelled
    host, port = gateway.removeprefix("http://").removesuffix("/v1").split(":")
    body = orjson.dumps({**CHAT, "mock": {"stall_after_chunks": 1}})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"tok0" not in received:
            received += sock.recv(65536)
    # The upstream stream is stalled forever; only the gateway noticing the hang-up ends it.
    deadline = time.monotonic() + 2
    while upstream.stats.streams_cancelled == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.stats.streams_cancelled == before + 1


def test_completions_stream(gateway: str) -> None:
    body = {"model": "gpt-4o-mini", "prompt": "abc", "stream": True, "max_tokens": 2}
    with httpx.stream("POST", f"{gateway}/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    texts = [orjson.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "tok0 tok1 "
    assert events[-1] == "data: [DONE]"
