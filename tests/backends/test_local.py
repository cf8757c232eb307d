"""LocalBackend on the real packaged SmolLM2: OpenAI shapes, streaming, usage, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import pytest_asyncio

from sluice.backends.base import Route, UpstreamCall
from sluice.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    RateLimitError,
)
from tests.extras import needs_local

if TYPE_CHECKING:
    from sluice.backends.local import LocalBackend

pytestmark = [
    needs_local,
    pytest.mark.asyncio(loop_scope="module"),
]

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
LONG = [{"role": "user", "content": "Write a very long essay about the history of Rome."}]


def make_backend(**overrides: Any) -> LocalBackend:
    from sluice.backends.local import LocalBackend
    from sluice.engine.config import EngineConfig

    config = {"n_ctx": 1024, "threads": 1, "parallel": 4, **overrides}
    return LocalBackend("local-test", EngineConfig(**config))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LocalBackend]:
    b = make_backend()
    await b.start()
    yield b
    await b.close()


def call(route: Route, **body: Any) -> UpstreamCall:
    body.setdefault("model", "smollm2")
    return UpstreamCall(route, body, None, "req-1", bool(body.get("stream")))


async def chat(backend: LocalBackend, **body: Any) -> dict[str, Any]:
    reply = await backend.send(call("chat/completions", messages=MESSAGES, **body))
    assert reply.status == 200
    assert reply.content_type == "application/json"
    data: dict[str, Any] = orjson.loads(reply.body)
    return data


async def sse(backend: LocalBackend, route: Route, **body: Any) -> list[Any]:
    """Every event of a stream, parsed; the final [DONE] as the string itself."""
    raw = b""
    async with backend.stream(call(route, stream=True, **body)) as chunks:
        async for chunk in chunks:
            raw += chunk
    events: list[Any] = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: ")
        payload = block[6:]
        events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


async def test_chat_completion_is_an_exact_openai_object(backend: LocalBackend) -> None:
    from openai.types.chat import ChatCompletion

    data = await chat(backend, max_tokens=6, temperature=0)
    ChatCompletion.model_validate(data)
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == "smollm2"
    assert isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(backend.engine.tokenize_chat(MESSAGES))
    assert data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


async def test_greedy_chat_is_deterministic(backend: LocalBackend) -> None:
    a = await chat(backend, max_tokens=8, temperature=0)
    b = await chat(backend, max_completion_tokens=8, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


async def test_n_choices_run_together(backend: LocalBackend) -> None:
    data = await chat(backend, max_tokens=5, temperature=1.0, seed=7, n=3)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == sum(5 for _ in data["choices"])
    assert data["usage"]["prompt_tokens"] == len(backend.engine.tokenize_chat(MESSAGES))
    again = await chat(backend, max_tokens=5, temperature=1.0, seed=7, n=3)
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in data["choices"]]


async def test_stop_is_honoured(backend: LocalBackend) -> None:
    full = (await chat(backend, max_tokens=16, temperature=0))["choices"][0]["message"]["content"]
    stop = full.split()[2]
    data = await chat(backend, max_tokens=16, temperature=0, stop=stop)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["message"]["content"]
    assert full.startswith(choice["message"]["content"])


async def test_text_completion_with_several_prompts(backend: LocalBackend) -> None:
    from openai.types import Completion

    prompts = ["The capital of France is", "One, two, three,"]
    reply = await backend.send(
        call("completions", prompt=prompts, max_tokens=4, temperature=0, n=2)
    )
    data = orjson.loads(reply.body)
    Completion.model_validate(data)
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["choices"][0]["text"] == data["choices"][1]["text"]  # greedy, same prompt
    assert data["usage"]["prompt_tokens"] == sum(len(backend.engine.tokenize(p)) for p in prompts)
    assert data["usage"]["completion_tokens"] == 16


async def test_chat_stream_chunks(backend: LocalBackend) -> None:
    from openai.types.chat import ChatCompletionChunk

    events = await sse(
        backend,
        "chat/completions",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream_options={"include_usage": True},
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, final, usage = chunks
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    non_stream = await chat(backend, max_tokens=8, temperature=0)
    assert text == non_stream["choices"][0]["message"]["content"]
    assert usage["usage"] == non_stream["usage"]


async def test_stream_without_usage_and_with_n(backend: LocalBackend) -> None:
    events = await sse(
        backend, "chat/completions", messages=MESSAGES, max_tokens=3, temperature=0, n=2
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in c for c in chunks)
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]


async def test_completion_stream_chunks(backend: LocalBackend) -> None:
    events = await sse(backend, "completions", prompt="Once upon a time", max_tokens=5)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens"),
        ({"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "top_k": -1}, "top_k"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "seed": 1.5}, "seed"),
        ({"messages": MESSAGES, "stop": 5}, "stop"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
    ],
)
async def test_invalid_fields_are_named(
    backend: LocalBackend, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await backend.send(call("chat/completions", **body))
    assert info.value.param == param
    assert info.value.http_status == 400


async def test_bad_completion_prompt(backend: LocalBackend) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await backend.send(call("completions", prompt=[1, "x"]))
    assert info.value.param == "prompt"


async def test_context_overflow_is_400(backend: LocalBackend) -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        await backend.send(call("chat/completions", messages=MESSAGES, max_tokens=1024))
    assert info.value.http_status == 400
    assert info.value.code == "context_length_exceeded"
    huge = [{"role": "user", "content": "word " * 1100}]
    with pytest.raises(ContextLengthExceededError):
        async with backend.stream(call("chat/completions", messages=huge, stream=True)):
            pass


async def test_embeddings_are_refused(backend: LocalBackend) -> None:
    with pytest.raises(InvalidRequestError):
        await backend.send(call("embeddings", input="hello"))


async def test_abandoned_stream_frees_its_slot(backend: LocalBackend) -> None:
    async with backend.stream(
        call("chat/completions", messages=LONG, max_tokens=500, temperature=0, stream=True, n=2)
    ) as chunks:
        await anext(chunks)
        assert backend.engine.stats().running == 2
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while backend.engine.stats().running:
        assert loop.time() < deadline
        await asyncio.sleep(0.02)
    assert backend.engine.stats().free_slots == 4


async def test_queue_overflow_is_429_with_retry_after() -> None:
    b = make_backend(parallel=1, max_queue=0)
    await b.start()
    try:
        async with b.stream(
            call("chat/completions", messages=LONG, max_tokens=500, temperature=0, stream=True)
        ) as chunks:
            await anext(chunks)
            with pytest.raises(RateLimitError) as info:
                await b.send(call("chat/completions", messages=MESSAGES, max_tokens=2))
            assert info.value.http_status == 429
            assert info.value.headers["Retry-After"] == "1"
    finally:
        await b.close()
