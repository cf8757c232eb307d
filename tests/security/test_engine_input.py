"""Hostile input to the embedded engine's request validation (no model needed).

Every bound holds before anything is tokenized (the tokenizer here fails the test if it is
called when it should not be), and no input makes validation raise anything but a 400.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.backends.local_params import (
    INT32_MAX,
    MAX_STOP_CHARS,
    Kind,
    Tokenizer,
    build,
    parse,
    tokenize,
    validate,
)
from sluice.engine.chat_template import ChatTemplate, ChatTemplateError
from sluice.engine.types import RequestLimits
from sluice.errors import ContextLengthExceededError, InvalidRequestError

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
LIMITS = RequestLimits(n_ctx=64, n_vocab=1000, max_sequences=16, max_prompt_chars=64 * 4)
CHAT = [{"role": "user", "content": "hi"}]


class CountingTokenizer:
    """One token per character; counts the characters it was asked to tokenize."""

    def __init__(self) -> None:
        self.chars = 0
        self.calls = 0

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        self.calls += 1
        self.chars += len(text)
        return [ord(c) % 1000 for c in text]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "\x01" + "".join(m["content"] for m in messages)


def run(kind: Kind, body: dict[str, Any], tok: Tokenizer | None = None) -> Any:
    return parse(kind, body, tok or CountingTokenizer(), LIMITS)


def refused(kind: Kind, body: dict[str, Any], tok: Tokenizer | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        run(kind, body, tok)
    return info.value


# -- prompts x n: capped before tokenizing or expanding ------------------------------------


def test_a_million_prompts_times_n_128_is_refused_before_tokenizing() -> None:
    tok = CountingTokenizer()
    error = refused("text", {"prompt": ["x"] * 1_000_000, "n": 128}, tok)
    assert error.status == 400
    assert error.param == "n"
    assert "16" in str(error)
    assert tok.calls == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a"] * 17}, "prompt"),
        ({"prompt": [[1]] * 17}, "prompt"),
        ({"prompt": ["a", "b"], "n": 9}, "n"),
        ({"prompt": "a", "n": 17}, "n"),
    ],
)
def test_sequences_per_request_are_capped(body: dict[str, Any], param: str) -> None:
    tok = CountingTokenizer()
    assert refused("text", body, tok).param == param
    assert tok.calls == 0


def test_chat_n_is_capped() -> None:
    assert refused("chat", {"messages": CHAT, "n": 17}).param == "n"
    assert len(run("chat", {"messages": CHAT, "n": 16, "max_tokens": 1}).requests) == 16


def test_the_cap_is_exactly_the_limit() -> None:
    job = run("text", {"prompt": ["a", "b"], "n": 8, "max_tokens": 1})
    assert len(job.requests) == 16


def test_an_overlong_text_prompt_is_refused_without_tokenizing() -> None:
    tok = CountingTokenizer()
    error = refused("text", {"prompt": ["ok", "x" * (LIMITS.max_prompt_chars + 1)]}, tok)
    assert isinstance(error, ContextLengthExceededError)
    assert error.param == "prompt"
    assert tok.calls == 0


def test_tokenizing_stops_at_the_first_prompt_that_cannot_fit() -> None:
    tok = CountingTokenizer()
    refused("text", {"prompt": ["y" * 100] + ["z" * 60] * 15}, tok)
    assert tok.calls == 1


def test_an_overlong_token_prompt_is_refused_before_it_is_read() -> None:
    error = refused("text", {"prompt": [1] * 64})
    assert isinstance(error, ContextLengthExceededError)
    # A million "tokens" of junk are not scanned either: the length refuses them first.
    assert isinstance(refused("text", {"prompt": [1] + ["x"] * 1_000_000}), InvalidRequestError)


def test_token_ids_outside_the_vocabulary() -> None:
    assert refused("text", {"prompt": [5, 1000]}).param == "prompt"
    assert refused("text", {"prompt": [[5], [-1]]}).param == "prompt"


def test_a_conversation_longer_than_the_context_is_not_rendered() -> None:
    class NoRender(CountingTokenizer):
        def render_chat(self, messages: list[dict[str, Any]]) -> str:
            raise AssertionError("rendered")

    messages = [{"role": "user", "content": ""}] * (LIMITS.n_ctx + 1)
    assert refused("chat", {"messages": messages}, NoRender()).param == "messages"
    parts = [{"type": "text", "text": ""}] * (LIMITS.n_ctx + 1)
    body = {"messages": [{"role": "user", "content": parts}]}
    assert refused("chat", body, NoRender()).param == "messages"


def test_a_rendered_chat_longer_than_can_fit_is_not_tokenized() -> None:
    tok = CountingTokenizer()
    body = {"messages": [{"role": "user", "content": "x" * LIMITS.max_prompt_chars}]}
    assert isinstance(refused("chat", body, tok), ContextLengthExceededError)
    assert tok.calls == 0


def test_a_chat_full_of_special_token_text_is_not_tokenized() -> None:
    """llama.cpp's special-token pass is quadratic in their number: bounded by the context."""
    limits = replace(LIMITS, special_texts=("<|im_end|>", "<|im_start|>"), max_prompt_chars=10**6)
    tok = CountingTokenizer()
    few = {"messages": [{"role": "user", "content": "<|im_end|>" * 2}], "max_tokens": 1}
    assert parse("chat", few, tok, limits).requests
    many = {"messages": [{"role": "user", "content": "<|im_start|>" * (LIMITS.n_ctx + 1)}]}
    with pytest.raises(ContextLengthExceededError):
        parse("chat", many, tok, limits)
    assert tok.calls == 1  # only the first chat was tokenized


def test_the_template_sees_only_role_content_and_name() -> None:
    seen: list[dict[str, Any]] = []

    class Recording(CountingTokenizer):
        def render_chat(self, messages: list[dict[str, Any]]) -> str:
            seen.extend(messages)
            return "x"

    message = {"role": "user", "content": "a", "name": "n", "tool_calls": [[[[1]]]], "x": 1}
    run("chat", {"messages": [message], "max_tokens": 1}, Recording())
    assert seen == [{"role": "user", "content": "a", "name": "n"}]


def test_draft_chars_measure_the_work_to_tokenize() -> None:
    assert validate("text", {"prompt": ["ab", "cde"]}, LIMITS).chars == 5
    assert validate("text", {"prompt": [1, 2, 3]}, LIMITS).chars == 0
    assert (
        validate("chat", {"messages": [{"role": "user", "content": "x" * 100}]}, LIMITS).chars > 100
    )


# -- priority: the key's, never the body's -------------------------------------------------


def test_a_body_priority_is_ignored() -> None:
    tok = CountingTokenizer()
    draft = validate("chat", {"messages": CHAT, "priority": 100, "max_tokens": 1}, LIMITS)
    assert build(draft, tokenize(draft, tok)).requests[0].priority == 0
    assert build(draft, tokenize(draft, tok), priority=7).requests[0].priority == 7
    assert run("chat", {"messages": CHAT, "priority": 100}).requests[0].priority == 0


# -- every other field: a clear 400 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", True),
        ("n", "2"),
        ("n", 2.0),
        ("n", 0),
        ("n", 129),
        ("max_tokens", True),
        ("max_tokens", "16"),
        ("max_tokens", 0),
        ("max_tokens", 10**30),
        ("max_completion_tokens", 64),
        ("temperature", "0.5"),
        ("temperature", True),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", 10**400),
        ("top_p", 0),
        ("top_p", [1]),
        ("top_k", -1),
        ("top_k", INT32_MAX + 1),
        ("top_k", 10**30),
        ("top_k", "40"),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("seed", False),
        ("stop", ["a"] * 5),
        ("stop", ["a"] * 1_000_000),
        ("stop", "x" * (MAX_STOP_CHARS + 1)),
        ("stop", [1]),
        ("stop", {"a": 1}),
        ("logit_bias", {str(i): 1 for i in range(301)}),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"9" * 5000: 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"5": "1"}),
        ("logit_bias", {"5000": 1}),
        ("logit_bias", [1]),
        ("stream", "true"),
        ("stream_options", {"include_usage": True}),
        ("logprobs", True),
        ("tools", [{"type": "function"}]),
    ],
)
def test_bad_fields_are_400_naming_the_field(field: str, value: Any) -> None:
    error = refused("chat", {"messages": CHAT, field: value})
    assert error.status == 400
    assert error.param == field


def test_valid_logit_bias_is_accepted() -> None:
    run("chat", {"messages": CHAT, "logit_bias": {"5": -100, "999": 100.0}, "max_tokens": 1})


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text", "text": {"nested": [1, 2]}}],
        [{"type": "text"}],
        [{"type": "text", "text": 5}],
        [{"type": "image_url", "image_url": {"url": "x"}}],
        ["text"],
        {"type": "text", "text": "x"},
        5,
    ],
)
def test_bad_message_content_is_400(content: Any) -> None:
    error = refused("chat", {"messages": [{"role": "user", "content": content}]})
    assert error.param == "messages[0].content"


def test_deeply_nested_content_is_400_not_a_recursion_error() -> None:
    deep: Any = "x"
    for _ in range(sys.getrecursionlimit() + 100):
        deep = [deep]
    refused("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": deep}]}]})
    # A model that is not a string (the API refuses it first) is never str()'d here.
    assert run("chat", {"messages": CHAT, "model": deep, "max_tokens": 1}).model == ""


def test_a_failing_template_is_a_400() -> None:
    template = ChatTemplate("{{ 1 // 0 }}")
    with pytest.raises(ChatTemplateError):
        template.render(CHAT)


# -- Hypothesis over the whole of validation ------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
SMALL_INTS = st.integers(min_value=-3, max_value=70)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
    JUNK,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), JUNK),
            "content": st.one_of(st.text(max_size=40), st.lists(PART, max_size=3), JUNK),
        },
        optional={"name": JUNK, "tool_calls": JUNK},
    ),
    JUNK,
)
PROMPT = st.one_of(
    st.text(max_size=80),
    st.lists(st.text(max_size=20), max_size=20),
    st.lists(st.one_of(SMALL_INTS, st.integers(), JUNK), max_size=70),
    st.lists(st.lists(st.one_of(SMALL_INTS, JUNK), max_size=5), max_size=20),
    JUNK,
)
NUMBER = st.one_of(SMALL_INTS, st.floats(min_value=-1, max_value=3), JUNK)
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": JUNK,
        "n": st.one_of(st.integers(min_value=-1, max_value=20), JUNK),
        "max_tokens": st.one_of(SMALL_INTS, JUNK),
        "max_completion_tokens": st.one_of(SMALL_INTS, JUNK),
        "temperature": NUMBER,
        "top_p": NUMBER,
        "top_k": st.one_of(SMALL_INTS, st.integers(), JUNK),
        "seed": st.one_of(st.integers(), JUNK),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), JUNK),
        "stream": st.one_of(st.booleans(), JUNK),
        "stream_options": JUNK,
        "logit_bias": st.one_of(
            st.dictionaries(st.text(max_size=6), st.one_of(SMALL_INTS, JUNK), max_size=4), JUNK
        ),
        "priority": JUNK,
        "logprobs": JUNK,
        "echo": JUNK,
        "tools": JUNK,
        "messages": st.one_of(st.lists(MESSAGE, max_size=4), JUNK),
        "prompt": PROMPT,
    },
)


def _engine_accepts(job: Any) -> None:
    """What validation lets through is within every bound the engine and llama.cpp hold."""
    assert len(job.requests) <= LIMITS.max_sequences
    for req in job.requests:
        assert req.prompt_tokens
        assert req.max_tokens >= 1
        assert len(req.prompt_tokens) + req.max_tokens <= LIMITS.n_ctx
        assert all(0 <= t < LIMITS.n_vocab for t in req.prompt_tokens)
        assert 0 <= req.top_k <= INT32_MAX
        assert 0.0 <= req.temperature <= 2.0
        assert 0.0 < req.top_p <= 1.0
        assert req.priority == 0
        if HAVE_LLAMA:
            import llama_cpp

            from sluice.engine.sequence import make_sampler

            llama_cpp.llama_sampler_free(make_sampler(req))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["chat", "text"]), body=BODY)
def test_validation_only_ever_answers_400_or_a_job(kind: Kind, body: dict[str, Any]) -> None:
    try:
        job = run(kind, body)
    except InvalidRequestError:  # 400, and its subclass ContextLengthExceededError
        return
    _engine_accepts(job)


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)})
VALID_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.one_of(st.none(), st.text(max_size=30), st.lists(TEXT_PART, max_size=3)),
    },
    optional={"name": st.text(max_size=5)},
)
VALID = {
    "n": st.integers(min_value=1, max_value=4),
    "max_tokens": st.integers(min_value=1, max_value=40),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=0, max_value=2000),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
    "stream": st.booleans(),
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=999).map(str),
        st.integers(min_value=-100, max_value=100),
        max_size=4,
    ),
    "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=4),
    "prompt": st.one_of(
        st.text(min_size=1, max_size=40),
        st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4),
        st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=40),
        st.lists(
            st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=10),
            min_size=1,
            max_size=4,
        ),
    ),
}
EDGE = st.one_of(
    JUNK,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([True, False, 0, -1, 2**31, 2**63, 1e308, "1", "0.5", "", [], {}]),
    st.floats(),
    st.lists(st.integers(), max_size=70),
    st.lists(st.lists(st.integers(), max_size=3), max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["chat", "text"]), data=st.data())
def test_one_bad_field_among_good_ones_is_400_or_a_job(kind: Kind, data: st.DataObject) -> None:
    body = data.draw(st.fixed_dictionaries({}, optional=VALID))
    for name in data.draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        body[name] = data.draw(EDGE)
    try:
        job = run(kind, body)
    except InvalidRequestError:
        return
    _engine_accepts(job)


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
def test_the_setting_reaches_the_engine() -> None:
    from prometheus_client import CollectorRegistry

    from sluice.backends.registry import default_providers
    from sluice.routing.table import build_table
    from sluice.settings import Settings

    deployment = {"provider": "local", "max_sequences_per_request": 4}
    settings = Settings(models=[{"name": "local", "deployments": [deployment]}])
    [built] = build_table(settings, default_providers(CollectorRegistry())).fresh
    assert built.backend.engine.config.max_sequences_per_request == 4  # type: ignore[attr-defined]
    default = Settings(models=[{"name": "local", "deployments": [{"provider": "local"}]}])
    [built] = build_table(default, default_providers(CollectorRegistry())).fresh
    assert built.backend.engine.config.max_sequences_per_request == 16  # type: ignore[attr-defined]
