"""Hypothesis over the gateway's request validation (`sluice.protocol`), directly and through
HTTP: hostile values for the fields the gateway reads (strings, floats, booleans, huge and
negative integers, null, nested values) are passed through or refused with a 400 that names
the field, never a 500; and nothing that sizes a reservation can be made to reserve less
than the upstream may produce.

What the gateway refuses, as OpenAI types them: ``n`` and ``best_of`` integers 1-128,
``max_tokens`` / ``max_completion_tokens`` integers 1 to 2**31-1, ``temperature`` a number
0-2, ``top_p`` 0-1, ``seed`` a 64-bit integer, ``stream`` a boolean, ``stream_options`` an
object whose ``include_usage`` is a boolean, ``model`` a non-empty string, ``messages`` a
non-empty array of objects with a role, ``prompt`` / ``input`` text or token ids. Every
other field passes through untouched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice.backends.base import Route
from sluice.errors import InvalidRequestError
from sluice.protocol import (
    MAX_N,
    MAX_TOKENS,
    SEED_RANGE,
    completion_ceiling,
    parse_json_object,
    validate,
)
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

MASTER = "sk-master-for-validation-0123456789"
DEFAULT_MAX_TOKENS = 1024
TPM = 50_000
# Examples scale with SLUICE_FUZZ_EXAMPLES (30 by default, as in test_openapi_fuzz.py).
SCALE = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "30")) / 30
T = TypeVar("T")

BASES: dict[Route, dict[str, Any]] = {
    "chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "gpt-4o-mini", "prompt": "hi"},
    "embeddings": {"model": "text-embedding-3-small", "input": "hi"},
}
FIELDS = (
    "n",
    "best_of",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stream",
    "stream_options",
    "messages",
    "prompt",
    "input",
    "model",
    "stop",
    "encoding_format",
    "dimensions",
)

# Values a hostile client sends: what JSON can carry, biased to the edges of every bound.
edge_ints = st.sampled_from(
    [0, 1, 2, -1, MAX_N, MAX_N + 1, MAX_TOKENS, MAX_TOKENS + 1, 2**63 - 1, 2**63, 2**64 - 1]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    edge_ints,
    st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e9, 5.0, 0.5, -0.0, 2.0000001, 1e300, 1e-300]),
    st.text(max_size=8),
    st.sampled_from(["5", "1e9", "true", "", "NaN", "Infinity", "0x10"]),
)
hostile = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# A few recognisable shapes for the fields that hold structures.
shaped = st.one_of(
    hostile,
    st.lists(st.dictionaries(st.sampled_from(["role", "content"]), hostile), max_size=3),
    st.fixed_dictionaries({"include_usage": hostile}),
    st.lists(edge_ints, min_size=1, max_size=3),
    st.lists(st.lists(edge_ints, max_size=3), min_size=1, max_size=3),
    st.lists(st.text(max_size=4), min_size=1, max_size=3),
)
changes = st.dictionaries(st.sampled_from(FIELDS), shaped, min_size=1, max_size=4)
routes = st.sampled_from(list(BASES))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def worst_case(route: Route, body: dict[str, Any]) -> int:
    """The most completion tokens an upstream may produce for an accepted ``body``, under
    every reading of it: either limit field, ``n`` or ``best_of`` choices, every prompt."""
    if route == "embeddings":
        return 0
    limits = [body[f] for f in ("max_tokens", "max_completion_tokens") if body.get(f) is not None]
    choices = max(body.get("n") or 1, body.get("best_of") or 1 if route == "completions" else 1)
    prompts = 1
    prompt = body.get("prompt")
    if route == "completions" and isinstance(prompt, list) and not _is_int(prompt[0]):
        prompts = len(prompt)
    return max(limits or [DEFAULT_MAX_TOKENS]) * choices * prompts


def check_accepted(route: Route, body: dict[str, Any]) -> None:
    """What an accepted body promises the rest of the gateway."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if route != "embeddings" and value is not None:
            assert _is_int(value), (name, value)
            assert 1 <= value <= MAX_TOKENS, (name, value)
    for name in ("n", "best_of") if route == "completions" else ("n",):
        if route != "embeddings" and body.get(name) is not None:
            assert _is_int(body[name]), (name, body[name])
            assert 1 <= body[name] <= MAX_N, (name, body[name])
    if route != "embeddings":
        for name, high in (("temperature", 2), ("top_p", 1)):
            value = body.get(name)
            if value is not None:
                assert isinstance(value, int | float)
                assert not isinstance(value, bool)
                assert 0 <= value <= high
        if body.get("seed") is not None:
            assert _is_int(body["seed"])
            assert SEED_RANGE[0] <= body["seed"] <= SEED_RANGE[1]
        assert body.get("stream") in (None, True, False)
    assert isinstance(body["model"], str)
    assert body["model"]
    options = body.get("stream_options")
    assert options is None or (
        isinstance(options, dict) and options.get("include_usage") in (None, True, False)
    )
    assert completion_ceiling(route, body, DEFAULT_MAX_TOKENS)[0] >= worst_case(route, body)


def outcome(call: Callable[[], T]) -> T | InvalidRequestError:
    """The call's result, or the 400 it raised (anything else fails the test)."""
    try:
        return call()
    except InvalidRequestError as exc:
        return exc


def refused_param_names_a_field(param: str | None, changed: set[str]) -> bool:
    if param is None:
        return False
    head = param.split(".")[0].split("[")[0]
    return head in changed or head in ("messages", "prompt", "input", "model")


@settings(max_examples=int(400 * SCALE), deadline=None)
@given(route=routes, change=changes)
@example(route="embeddings", change={"stream_options": [1]})  # AttributeError before the fix
@example(route="embeddings", change={"stream_options": "yes"})
@example(route="chat/completions", change={"n": True})
@example(route="chat/completions", change={"max_tokens": 1e9})
@example(route="chat/completions", change={"max_tokens": "5"})
@example(route="chat/completions", change={"n": 10**30})
@example(route="chat/completions", change={"max_tokens": MAX_TOKENS + 1})
@example(route="chat/completions", change={"max_completion_tokens": 1, "max_tokens": 10**6})
@example(route="completions", change={"max_completion_tokens": 1, "max_tokens": 10**6})
@example(route="completions", change={"best_of": 20, "max_tokens": 100})
@example(route="completions", change={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 7})
def test_validation_passes_or_names_the_field(route: Route, change: dict[str, Any]) -> None:
    body = {**BASES[route], **change}
    answer = outcome(lambda: validate(route, body))
    if isinstance(answer, InvalidRequestError):
        assert answer.http_status == 400
        assert refused_param_names_a_field(answer.param, set(change)), (answer.param, change)
        assert answer.param is not None
        assert answer.param.split("[")[0].split(".")[0] in answer.message
        return
    assert answer == body["model"]
    check_accepted(route, body)


@settings(max_examples=int(300 * SCALE), deadline=None)
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
@example(raw=b'{"n": 100000000000000000000000000000}')
@example(raw=b'{"t": 1e400}')
@example(raw=b'{"a": "\\ud800"}')
@example(raw=b"[" * 5000 + b"]" * 5000)
@example(raw=b"\xff\xfe")
def test_parsing_any_bytes_is_an_object_or_a_400(raw: bytes) -> None:
    answer = outcome(lambda: parse_json_object(raw))
    if isinstance(answer, InvalidRequestError):
        assert answer.http_status == 400
    else:
        assert isinstance(answer, dict)


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("embeddings", {"stream_options": [1]}, "stream_options"),
        ("chat/completions", {"max_tokens": 2**31}, "max_tokens"),
        ("completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("completions", {"best_of": 129}, "best_of"),
        ("completions", {"best_of": True}, "best_of"),
        ("chat/completions", {"seed": 2**64 - 1}, "seed"),
        ("chat/completions", {"model": ""}, "model"),
    ],
)
def test_refusals_found_by_the_fuzz(route: Route, body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate(route, {**BASES[route], **body})
    assert caught.value.param == param


# Through HTTP: a gateway with auth on, a key with a tokens-per-minute limit.


class Limited:
    def __init__(self, url: str, key: str, budgeted: str) -> None:
        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        self.budgeted = budgeted  # a key with a $1 budget: 500 completion tokens' worth


@pytest.fixture(scope="module")
def limited(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    os.environ["SLUICE_VALIDATION_MASTER_KEY"] = MASTER
    config = config_for(upstream.url)
    data_dir: Path = tmp_path_factory.mktemp("validation")
    config["models"][0]["pricing"] = {"prompt_per_million": 0, "completion_per_million": 2000}
    config.update(
        auth={"master_key": "os.environ/SLUICE_VALIDATION_MASTER_KEY"},
        limits={"default_max_tokens": DEFAULT_MAX_TOKENS},
        data_dir=str(data_dir),
    )
    with running_gateway(config) as url:
        admin = {"Authorization": f"Bearer {MASTER}"}
        admin_url = f"{url.removesuffix('/v1')}/admin/keys"
        created = httpx.post(admin_url, json={"tpm": TPM}, headers=admin)
        assert created.status_code == 201, created.text
        budgeted = httpx.post(admin_url, json={"budget_usd": 1}, headers=admin)
        assert budgeted.status_code == 201, budgeted.text
        gateway = Limited(url, created.json()["key"], budgeted.json()["key"])
        with gateway.client:
            yield gateway


def _post(gateway: Limited, route: Route, body: dict[str, Any]) -> httpx.Response:
    body.pop("mock", None)  # the mock upstream's control field: never asked to fail here
    # stdlib json writes integers of any size, as a hostile client may.
    return gateway.client.post(
        f"/{route}", content=json.dumps(body), headers={"content-type": "application/json"}
    )


@settings(
    max_examples=int(120 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(route=routes, change=changes)
@example(route="chat/completions", change={"max_completion_tokens": 1, "max_tokens": TPM * 2})
@example(route="completions", change={"best_of": 100, "max_tokens": TPM // 50})
@example(route="completions", change={"prompt": ["a"] * 100, "max_tokens": TPM // 50})
@example(route="completions", change={"max_completion_tokens": 1, "max_tokens": TPM * 2})
@example(route="embeddings", change={"stream_options": [1]})
@example(route="chat/completions", change={"n": 2**64, "max_tokens": -(2**70)})
def test_http_answers_200_or_a_400_naming_the_field_or_a_429(
    limited: Limited, route: Route, change: dict[str, Any]
) -> None:
    body = {**BASES[route], **change}
    if body.get("stream") is True:
        body["stream"] = False  # the answer's status is all this test reads
    response = _post(limited, route, dict(body))
    assert response.status_code in (200, 400, 404, 429), response.text
    if response.status_code == 400:
        param = response.json()["error"]["param"]
        assert refused_param_names_a_field(param, set(change)), (param, change)
        return
    if response.status_code == 404:
        assert response.json()["error"]["code"] == "model_not_found"
        return
    validate(route, body)  # what the gateway let through, it validated
    if worst_case(route, body) > TPM:
        assert response.status_code == 429, ("under-reserved", body)
        assert response.json()["error"]["code"] == "rate_limit_tpm"


@pytest.mark.parametrize(
    ("route", "change"),
    [
        ("chat/completions", {"max_completion_tokens": 1, "max_tokens": TPM * 2}),
        ("completions", {"max_completion_tokens": 1, "max_tokens": TPM * 2}),
        ("completions", {"best_of": 100, "max_tokens": TPM // 50}),
        ("completions", {"prompt": ["a"] * 100, "max_tokens": TPM // 50}),
        ("completions", {"prompt": [[1, 2]] * 100, "n": 2, "max_tokens": TPM // 100}),
    ],
)
def test_requests_that_may_use_more_than_the_limit_are_refused(
    limited: Limited, route: Route, change: dict[str, Any]
) -> None:
    """Each reserved less than it could use before `completion_ceiling`: the smaller of
    the two limit fields, one choice for ``best_of``, one prompt for a list of them."""
    response = _post(limited, route, {**BASES[route], **change})
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limit_tpm"


@pytest.mark.parametrize(
    ("route", "change"),
    [
        ("chat/completions", {"max_completion_tokens": 1, "max_tokens": 1000}),
        ("completions", {"best_of": 10, "max_tokens": 100}),
        ("completions", {"prompt": ["a"] * 10, "max_tokens": 100}),
    ],
)
def test_budget_holds_the_same_ceiling(
    limited: Limited, route: Route, change: dict[str, Any]
) -> None:
    """A $1 budget at $2,000 per million completion tokens covers 500 tokens. While a
    small request is held in flight (the mock answers it after 1 s), each of these, which
    may produce 1,000 tokens, does not fit; each was held as 1 or 100 tokens before. (A
    request that finds nothing held is admitted whatever its cost: the budget's rule.)"""
    headers = {"Authorization": f"Bearer {limited.budgeted}"}
    slow = {**BASES["chat/completions"], "max_tokens": 1, "mock": {"latency_ms": 1000}}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(limited.client.post, "/chat/completions", json=slow, headers=headers)
        time.sleep(0.3)
        response = limited.client.post(
            f"/{route}", json={**BASES[route], **change}, headers=headers
        )
        assert held.result().status_code == 200
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "budget_exceeded"
