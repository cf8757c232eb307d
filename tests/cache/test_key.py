"""The exact key: what makes two requests the same, and what does not."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sluice.cache.key import request_key, scope_of

BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "temperature": 0,
    "max_tokens": 16,
}


def key_of(body: dict[str, Any], namespace: str = "key:a", model: str = "gpt-4o-mini") -> str:
    return request_key(namespace, "chat/completions", model, body)


def reparsed(text: str) -> dict[str, Any]:
    """A body as the gateway sees it: parsed from the client's bytes."""
    parsed: dict[str, Any] = orjson.loads(text)
    return parsed


def test_field_order_whitespace_and_number_spelling_do_not_matter() -> None:
    compact = reparsed(
        '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},'
        '{"role":"user","content":"What is 2 + 2?"}],"temperature":0,"max_tokens":16}'
    )
    spaced = reparsed(
        '{ "max_tokens" : 16.0 ,\n "temperature": 0.0e0, "messages": [ {"content": "Be brief.",'
        ' "role": "system"}, {"content": "What is 2 + 2?", "role": "user"} ],\n'
        ' "model": "gpt-4o-mini" }'
    )
    negative_zero = {**BASE, "temperature": -0.0}
    assert key_of(compact) == key_of(spaced) == key_of(BASE) == key_of(negative_zero)


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},  # no system prompt
        {"messages": [*BASE["messages"], {"role": "assistant", "content": "4"}]},  # history
        {"messages": [BASE["messages"][0], {"role": "user", "content": "What is 2 + 2 ?"}]},
        {"tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"top_k": 40},
        {"seed": 7},
        {"max_tokens": 17},
        {"max_completion_tokens": 16},
        {"n": 2},
        {"stop": ["\n"]},
        {"logit_bias": {"50256": -100}},
        {"presence_penalty": 0.1},
        {"frequency_penalty": 0.1},
        {"logprobs": True},
        {"reasoning_effort": "low"},
        {"x_unknown_vendor_field": 1},  # unknown pass-through fields count too
    ],
)
def test_every_output_changing_field_changes_the_key(change: dict[str, Any]) -> None:
    assert key_of({**BASE, **change}) != key_of(BASE)


@pytest.mark.parametrize(
    "delivery",
    [
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"user": "someone"},
        {"metadata": {"trace": "x"}},
        {"store": False},
        {"cache": {"no-store": True}},
    ],
)
def test_delivery_fields_do_not(delivery: dict[str, Any]) -> None:
    assert key_of({**BASE, **delivery}) == key_of(BASE)


def test_namespace_route_and_served_model_are_part_of_the_key() -> None:
    assert key_of(BASE, namespace="key:a") != key_of(BASE, namespace="key:b")
    assert key_of(BASE, model="gpt-4o-2024-08-06") != key_of(BASE)
    assert request_key("key:a", "completions", "gpt-4o-mini", BASE) != key_of(BASE)
    # The body's model is the client's name: the served model stands in for it.
    assert key_of({**BASE, "model": "alias"}) == key_of(BASE)


def test_a_string_that_looks_like_a_number_is_not_a_number() -> None:
    one = {**BASE, "messages": [{"role": "user", "content": "1"}]}
    one_point_zero = {**BASE, "messages": [{"role": "user", "content": "1.0"}]}
    assert key_of(one) != key_of(one_point_zero)


def test_semantic_scope_pins_everything_but_the_last_user_turn() -> None:
    scope, text = scope_of("key:a", "chat/completions", "m", BASE) or ("", "")
    assert text == "What is 2 + 2?"
    reworded = {**BASE, "messages": [BASE["messages"][0], {"role": "user", "content": "2+2=?"}]}
    assert scope_of("key:a", "chat/completions", "m", reworded) == (scope, "2+2=?")
    other_system = {
        **BASE,
        "messages": [{"role": "system", "content": "Be verbose."}, BASE["messages"][1]],
    }
    assert scope_of("key:a", "chat/completions", "m", other_system)[0] != scope  # type: ignore[index]
    assert scope_of("key:a", "chat/completions", "m", {**BASE, "temperature": 0.2}) != (
        scope,
        text,
    )
    assert scope_of("key:b", "chat/completions", "m", BASE) != (scope, text)
    last_is_assistant = {**BASE, "messages": [*BASE["messages"], {"role": "assistant"}]}
    assert scope_of("key:a", "chat/completions", "m", last_is_assistant) is None
