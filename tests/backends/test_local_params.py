"""OpenAI request parsing with a fake tokenizer (no model needed)."""

from __future__ import annotations

from typing import Any

import pytest

from sluice.backends.local_params import Job, Kind, Tokenizer
from sluice.backends.local_params import parse as parse_with
from sluice.engine.types import RequestLimits
from sluice.errors import ContextLengthExceededError, InvalidRequestError


class FakeTokenizer:
    """One token per character; a chat is a start token then every message's content."""

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return [ord(c) for c in text]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "\x01" + "".join(m["content"] for m in messages)


TOK = FakeTokenizer()
LIMITS = RequestLimits(n_ctx=64, n_vocab=1000, max_sequences=16, max_prompt_chars=64 * 4)


def parse(
    kind: Kind, body: dict[str, Any], tok: Tokenizer = TOK, limits: RequestLimits = LIMITS
) -> Job:
    return parse_with(kind, body, tok, limits)


def test_chat_defaults() -> None:
    job = parse("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert job.kind == "chat"
    assert job.model == "m"
    assert not job.stream
    assert job.prompt_tokens == 3
    [req] = job.requests
    assert list(req.prompt_tokens) == [1, ord("h"), ord("i")]
    assert req.max_tokens == 64 - 3  # the rest of the context
    assert (req.temperature, req.top_p, req.top_k, req.seed, req.stop) == (1.0, 1.0, 0, None, ())


def test_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    job = parse("chat", {"messages": [{"role": "user", "content": content}]})
    assert list(job.requests[0].prompt_tokens) == [1, ord("a"), ord("b")]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(InvalidRequestError) as info:
        parse("chat", {"messages": [{"role": "user", "content": image}]})
    assert info.value.param == "messages[0].content"


def test_n_and_seed_make_distinct_reproducible_choices() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "n": 3, "seed": 10, "max_tokens": 4}
    job = parse("chat", body)
    assert [r.seed for r in job.requests] == [10, 11, 12]
    assert job.prompt_tokens == 2  # counted once, not per choice


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("ab", [[97, 98]]),
        (["a", "bc"], [[97], [98, 99]]),
        ([5, 6], [[5, 6]]),
        ([[5], [6, 7]], [[5], [6, 7]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, expected: list[list[int]]) -> None:
    job = parse("text", {"prompt": prompt, "max_tokens": 2, "n": 2})
    assert [list(r.prompt_tokens) for r in job.requests] == [p for p in expected for _ in (0, 1)]
    assert job.prompt_tokens == sum(len(p) for p in expected)


@pytest.mark.parametrize("prompt", [None, "", [], [[]], [1, "x"], {"a": 1}, [True]])
def test_bad_completion_prompts(prompt: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse("text", {"prompt": prompt})
    assert info.value.param == "prompt"


def test_stream_options() -> None:
    body = {"prompt": "a", "stream": True, "stream_options": {"include_usage": True}}
    assert parse("text", body).include_usage
    body["stream_options"] = {"include_usage": "yes"}
    with pytest.raises(InvalidRequestError) as info:
        parse("text", body)
    assert info.value.param == "stream_options.include_usage"


def test_context_length() -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        parse("text", {"prompt": "a" * 10, "max_tokens": 55})
    assert info.value.param == "prompt"
    assert info.value.code == "context_length_exceeded"
    parse("text", {"prompt": "a" * 10, "max_tokens": 54})
    with pytest.raises(ContextLengthExceededError):
        parse("text", {"prompt": "a" * 64})


def test_stop_forms() -> None:
    base = {"prompt": "a", "max_tokens": 1}
    assert parse("text", {**base, "stop": "x"}).requests[0].stop == ("x",)
    assert parse("text", {**base, "stop": ["x", ""]}).requests[0].stop == ("x",)
    assert parse("text", {**base, "stop": None}).requests[0].stop == ()


def test_tools_are_refused() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    with pytest.raises(InvalidRequestError) as info:
        parse("chat", body)
    assert info.value.param == "tools"
