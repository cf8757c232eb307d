"""The mock upstream, driven over a real loopback socket."""

from __future__ import annotations

import base64
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from sluice.testing import MockBehaviour, MockUpstream

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "three little words"}]


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse ``data:`` lines into JSON objects; ``[DONE]`` is kept as the string."""
    events: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def wait_for(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return time.monotonic() - start


def test_non_stream_chat_shape_and_usage(mock: MockUpstream, client: httpx.Client) -> None:
    r = client.post(
        f"{mock.url}/chat/completions",
        json={"model": "gpt-test", "messages": CHAT},
        headers={"Authorization": "Bearer upstream-key", "X-Request-ID": "req-1"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-test"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert mock.stats.requests == 1
    assert mock.stats.by_route == {"chat/completions": 1}
    assert mock.stats.last_headers["authorization"] == "Bearer upstream-key"
    assert mock.stats.request_ids == ["req-1"]
    assert mock.stats.last_body == {"model": "gpt-test", "messages": CHAT}


def test_stream_chat_ends_with_done_and_usage(mock: MockUpstream, client: httpx.Client) -> None:
    body = {
        "model": "m",
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"completion_tokens": 3},
    }
    with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert content == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert len(chunks) == 6
    # The mock counts the stream once its handler returns, on its own thread, which can be
    # just after the client has read the last byte.
    wait_for(lambda: mock.stats.streams_completed == 1)
    assert mock.stats.streams_started == mock.stats.streams_completed == 1
    assert mock.stats.streams_cancelled == 0


def test_stream_without_include_usage_has_no_usage(
    mock: MockUpstream, client: httpx.Client
) -> None:
    body = {"model": "m", "messages": CHAT, "stream": True}
    with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in events[:-1])
    assert len(events) == 1 + 8 + 1 + 1  # role, tokens, finish, [DONE]


def test_length_finish_reason(mock: MockUpstream, client: httpx.Client) -> None:
    r = client.post(
        f"{mock.url}/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2}
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 "
    assert r.json()["usage"]["completion_tokens"] == 2

    body = {"model": "m", "prompt": "a b", "max_tokens": 1, "stream": True}
    with client.stream("POST", f"{mock.url}/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * 2
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["tok0 ", ""]
    assert events[1]["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]"


def test_text_completion_non_stream(mock: MockUpstream, client: httpx.Client) -> None:
    r = client.post(f"{mock.url}/completions", json={"model": "c", "prompt": [1, 2, 3, 4]})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("tok0 tok1 ")
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}


def test_status_injection_body_and_header(mock: MockUpstream, client: httpx.Client) -> None:
    url = f"{mock.url}/chat/completions"
    r = client.post(url, json={"model": "m", "messages": CHAT, "mock": {"status": 503}})
    assert r.status_code == 503
    assert r.json() == {
        "error": {
            "message": "mock injected status 503",
            "type": "api_error",
            "param": None,
            "code": "mock_error",
        }
    }
    r = client.post(url, json={"model": "m", "messages": CHAT}, headers={"x-mock-status": "429"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    # The body wins over the header; and an override never leaks into the next request.
    r = client.post(
        url, json={"messages": CHAT, "mock": {"status": 500}}, headers={"x-mock-status": "429"}
    )
    assert r.status_code == 500
    assert client.post(url, json={"messages": CHAT}).status_code == 200


def test_constructor_defaults_apply(client: httpx.Client) -> None:
    with MockUpstream(MockBehaviour(completion_tokens=2, status=401)) as m:
        assert client.post(f"{m.url}/chat/completions", json={}).status_code == 401
        r = client.post(f"{m.url}/chat/completions", json={"mock": {"status": 200}})
        assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 "


def test_reset_is_a_connection_error(mock: MockUpstream, client: httpx.Client) -> None:
    with pytest.raises(httpx.TransportError):
        client.post(
            f"{mock.url}/chat/completions", json={"messages": CHAT, "mock": {"reset": True}}
        )
    with pytest.raises(httpx.TransportError):
        client.post(f"{mock.url}/embeddings", json={"input": "x"}, headers={"x-mock-reset": "1"})
    assert mock.stats.requests == 2


def test_fail_after_chunks_truncates_without_done(mock: MockUpstream, client: httpx.Client) -> None:
    body = {"messages": CHAT, "stream": True, "mock": {"fail_after_chunks": 2}}
    lines: list[str] = []

    def read_all() -> None:
        with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines.extend(r.iter_lines())

    with pytest.raises(httpx.TransportError):
        read_all()
    events = sse_events(iter(lines))
    assert "[DONE]" not in events
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["", "tok0 ", "tok1 "]
    wait_for(lambda: mock.stats.streams_failed == 1)
    assert mock.stats.streams_completed == mock.stats.streams_cancelled == 0


def test_disconnect_during_stall_counts_as_cancelled(
    mock: MockUpstream, client: httpx.Client
) -> None:
    body = {"messages": CHAT, "stream": True, "mock": {"stall_after_chunks": 1}}
    with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        assert mock.stats.streams_cancelled == 0
    # Leaving the block closes the connection mid-stream.
    elapsed = wait_for(lambda: mock.stats.streams_cancelled == 1, timeout=1.0)
    assert elapsed < 1.0
    assert mock.stats.streams_started == 1
    assert mock.stats.streams_completed == 0


def test_disconnect_during_pacing_counts_as_cancelled(
    mock: MockUpstream, client: httpx.Client
) -> None:
    body = {"messages": CHAT, "stream": True, "mock": {"tokens_per_second": 2}}
    with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
        next(r.iter_lines())
    wait_for(lambda: mock.stats.streams_cancelled == 1, timeout=1.0)


def test_non_stream_stall_never_answers(mock: MockUpstream) -> None:
    with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            f"{mock.url}/chat/completions", json={"messages": CHAT}, headers={"x-mock-stall": "1"}
        )
    assert mock.stats.requests == 1


def test_stop_is_prompt_with_a_stalled_request() -> None:
    m = MockUpstream().start()
    errors: list[Exception] = []

    def call() -> None:
        try:
            httpx.post(f"{m.url}/chat/completions", json={"mock": {"stall": True}}, timeout=3)
        except httpx.TransportError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for(lambda: m.stats.requests == 1)
    start = time.monotonic()
    m.stop()
    assert time.monotonic() - start < 1.0
    caller.join(timeout=2)
    assert len(errors) == 1


def test_latency_and_pacing(mock: MockUpstream, client: httpx.Client) -> None:
    start = time.monotonic()
    r = client.post(
        f"{mock.url}/chat/completions",
        json={"messages": CHAT},
        headers={"x-mock-latency-ms": "150"},
    )
    assert r.status_code == 200
    assert time.monotonic() - start >= 0.15

    body = {
        "messages": CHAT,
        "stream": True,
        "mock": {"completion_tokens": 4, "tokens_per_second": 20},
    }
    start = time.monotonic()
    with client.stream("POST", f"{mock.url}/chat/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert time.monotonic() - start >= 0.15  # three 50 ms gaps between four tokens
    assert events[-1] == "[DONE]"


def test_embeddings_count_and_determinism(mock: MockUpstream, client: httpx.Client) -> None:
    url = f"{mock.url}/embeddings"
    r = client.post(url, json={"model": "emb", "input": ["hello world", "bye", "hello world"]})
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in body["data"]]
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-9
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}  # 2 + 1 + 2 words

    again = client.post(url, json={"input": "hello world", "mock": {"embedding_dim": 8}}).json()
    assert again["data"][0]["embedding"] == vectors[0]
    tokens = client.post(url, json={"input": [[1, 2, 3], [4]], "mock": {"embedding_dim": 3}}).json()
    assert [len(d["embedding"]) for d in tokens["data"]] == [3, 3]
    assert tokens["usage"]["prompt_tokens"] == 4

    b64 = client.post(url, json={"input": "hello world", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(vectors[0], abs=1e-6)

    assert mock.stats.embedding_calls == 4
    assert mock.stats.embedding_inputs == [3, 1, 2, 1]


def test_invalid_requests_get_openai_envelopes(mock: MockUpstream, client: httpx.Client) -> None:
    r = client.post(f"{mock.url}/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post(f"{mock.url}/chat/completions", json={"mock": {"latency": 5}})
    assert r.status_code == 400
    r = client.post(f"{mock.url}/embeddings", json={"input": []})
    assert r.status_code == 400
    r = client.post(f"{mock.url}/chat/completions", json={}, headers={"x-mock-stall": "maybe"})
    assert r.status_code == 400


def test_models_stats_and_reset(mock: MockUpstream, client: httpx.Client) -> None:
    models = client.get(f"{mock.url}/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "mock-model"
    client.post(f"{mock.url}/embeddings", json={"input": "a"}, headers={"x-request-id": "r9"})

    stats = client.get(f"{mock.base_url}/mock/stats").json()
    assert stats["requests"] == 2
    assert stats["by_route"] == {"models": 1, "embeddings": 1}
    assert stats["request_ids"] == ["r9"]
    assert stats["embedding_inputs"] == [1]

    assert client.post(f"{mock.base_url}/mock/reset").status_code == 200
    after = client.get(f"{mock.base_url}/mock/stats").json()
    assert after["requests"] == 0
    assert after["by_route"] == {}
    assert after["request_ids"] == []
    assert after["last_body"] is None
    assert mock.stats.embedding_calls == 0  # the same object, zeroed in place


def test_openai_sdk_parses_everything(mock: MockUpstream) -> None:
    with openai.OpenAI(base_url=mock.url, api_key="sk-test", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model="gpt-x", messages=CHAT)
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
        assert reply.usage is not None
        assert reply.usage.total_tokens == 11

        stream = sdk.chat.completions.create(
            model="gpt-x",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mock": {"completion_tokens": 2}},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok0 tok1 "
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 2

        emb = sdk.embeddings.create(model="e", input=["a", "b c"])  # SDK asks for base64
        assert [len(d.embedding) for d in emb.data] == [8, 8]
        assert emb.usage.prompt_tokens == 3

        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model="c", prompt="x", extra_body={"mock": {"status": 429}})
    assert mock.stats.last_headers["authorization"] == "Bearer sk-test"
