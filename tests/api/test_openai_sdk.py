"""The official openai SDK, sync and async, against Sluice on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from sluice.testing.mock_upstream import MockUpstream

MESSAGES = [{"role": "user", "content": "say something short"}]


@pytest.fixture
def client(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway, api_key="sk-client", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway, api_key="sk-client", max_retries=0) as sdk:
        yield sdk


def test_chat_completion(client: openai.OpenAI, upstream: MockUpstream) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8
    # The public name was mapped to the deployment's own model name.
    assert upstream.stats.last_body["model"] == "mock-chat"


def test_unused_fields_pass_through(client: openai.OpenAI, upstream: MockUpstream) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"vendor_knob": {"a": [1, 2]}, "top_k": 3},
        user="alice",
    )
    assert upstream.stats.last_body["vendor_knob"] == {"a": [1, 2]}
    assert upstream.stats.last_body["top_k"] == 3
    assert upstream.stats.last_body["user"] == "alice"


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_stream_without_usage_hides_the_gateways_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_chat_and_stream(aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        max_tokens=3,
    )
    texts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(t or "" for t in texts) == "tok0 tok1 tok2 "


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="gpt-4o-mini", prompt="once upon a time", max_tokens=2)
    assert reply.choices[0].text == "tok0 tok1 "
    assert reply.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="gpt-4o-mini", prompt="once upon a time", max_tokens=2, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "tok0 tok1 "


def test_embeddings(client: openai.OpenAI, upstream: MockUpstream) -> None:
    reply = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 8
    assert reply.data[0].embedding != reply.data[1].embedding
    assert upstream.stats.last_body["model"] == "text-embedding-3-small"


async def test_async_embeddings(aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert len(reply.data) == 1


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-4o-mini", "text-embedding-3-small"]
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    assert "gpt-9" in caught.value.message
    assert "127.0.0.1" not in caught.value.message  # nothing about deployments leaks


def test_schema_violation_names_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=7)  # type: ignore[arg-type]
    assert caught.value.param == "temperature"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_upstream_errors_raise_the_sdks_types(
    client: openai.OpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_body={"mock": {"status": status}},
        )
    assert caught.value.status_code == status
    assert caught.value.body == {
        "message": f"mock injected status {status}",
        "type": caught.value.body["type"],  # type: ignore[index]
        "param": None,
        "code": "mock_error",
    }


def test_upstream_error_in_stream_before_first_byte_is_a_status(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_body={"mock": {"status": 429}},
        )


def test_mid_stream_failure_raises_in_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_body={"mock": {"fail_after_chunks": 2}},
    )
    with pytest.raises(openai.APIError, match="broke mid-response"):
        list(stream)
