"""A local deployment's request defaults: used only for what a request omits."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sluice.backends.local_params import Job, Kind, RequestDefaults, parse
from sluice.engine.types import RequestLimits
from sluice.settings import LocalDeployment


class ShowingTokenizer:
    """One token per character of a chat rendered as ``role:content|`` per message."""

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return [ord(c) for c in text]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"{m['role']}:{m['content']}|" for m in messages)


LIMITS = RequestLimits(n_ctx=256, n_vocab=1000, max_sequences=16, max_prompt_chars=256 * 4)
DEFAULTS = RequestDefaults(
    temperature=0.2, top_p=0.9, top_k=50, max_tokens=32, system_prompt="Be kind."
)
USER = {"role": "user", "content": "hi"}


def run(kind: Kind, body: dict[str, Any], defaults: RequestDefaults = DEFAULTS) -> Job:
    return parse(kind, body, ShowingTokenizer(), LIMITS, 0, defaults)


def rendered(job: Job) -> str:
    return "".join(chr(t) for t in job.requests[0].prompt_tokens)


def test_omitted_fields_take_the_defaults() -> None:
    [req] = run("chat", {"messages": [USER]}).requests
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (0.2, 0.9, 50, 32)


def test_request_values_win() -> None:
    body = {"messages": [USER], "temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 100}
    [req] = run("chat", body).requests
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (0.0, 1.0, 0, 100)
    [req] = run("chat", {"messages": [USER], "max_completion_tokens": 7}).requests
    assert req.max_tokens == 7


def test_explicit_null_is_omitted() -> None:
    body = {"messages": [USER], "temperature": None, "top_p": None, "top_k": None}
    [req] = run("chat", body | {"max_tokens": None}).requests
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (0.2, 0.9, 50, 32)


def test_completions_take_sampling_and_max_tokens_but_no_system_prompt() -> None:
    job = run("text", {"prompt": "once"})
    [req] = job.requests
    assert (req.temperature, req.top_p, req.max_tokens) == (0.2, 0.9, 32)
    assert rendered(job) == "once"


def test_system_prompt_only_when_the_chat_has_none() -> None:
    assert rendered(run("chat", {"messages": [USER]})) == "system:Be kind.|user:hi|"
    own = {"messages": [{"role": "system", "content": "Be terse."}, USER]}
    assert rendered(run("chat", own)) == "system:Be terse.|user:hi|"
    developer = {"messages": [USER, {"role": "developer", "content": "Be terse."}]}
    assert rendered(run("chat", developer)) == "user:hi|developer:Be terse.|"


@pytest.mark.parametrize("prompt", [None, ""])
def test_no_system_prompt_leaves_the_templates_own(prompt: str | None) -> None:
    defaults = RequestDefaults(system_prompt=prompt)
    assert rendered(run("chat", {"messages": [USER]}, defaults)) == "user:hi|"


def test_default_max_tokens_is_cut_to_the_context_left() -> None:
    defaults = RequestDefaults(max_tokens=250)
    job = run("text", {"prompt": "x" * 100}, defaults)
    assert job.requests[0].max_tokens == 256 - 100
    assert run("text", {"prompt": "x"}, RequestDefaults()).requests[0].max_tokens == 255


def test_no_defaults_keeps_openai_behaviour() -> None:
    [req] = run("chat", {"messages": [USER]}, RequestDefaults()).requests
    assert (req.temperature, req.top_p, req.top_k) == (1.0, 1.0, 0)
    assert req.max_tokens == 256 - len("user:hi|")


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_tokens": 0},
    ],
)
def test_request_defaults_bounds(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RequestDefaults(**fields)
    with pytest.raises(ValidationError):
        LocalDeployment(provider="local", defaults=fields)


def test_deployment_defaults() -> None:
    spec = LocalDeployment(provider="local")
    assert spec.defaults.temperature == 0.2
    assert spec.defaults.top_p == 0.9
    assert spec.defaults.top_k == 50
    assert spec.defaults.max_tokens is not None
    assert spec.defaults.max_tokens < spec.context_size
    assert spec.defaults.system_prompt


def test_deployment_max_tokens_must_leave_room_for_a_prompt() -> None:
    with pytest.raises(ValidationError, match="below context_size"):
        LocalDeployment(provider="local", context_size=512, defaults={"max_tokens": 512})
    # The built-in default is not an error on a small context: it is cut per request.
    LocalDeployment(provider="local", context_size=256)
    spec = LocalDeployment(provider="local", defaults={"max_tokens": None, "system_prompt": None})
    assert spec.defaults.max_tokens is None
    assert spec.defaults.system_prompt is None


def test_unknown_default_is_refused() -> None:
    with pytest.raises(ValidationError):
        LocalDeployment(provider="local", defaults={"min_p": 0.05})


def test_the_provider_gives_the_backend_its_deployments_defaults() -> None:
    """The settings' defaults reach the backend that serves the deployment."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python (pip install 'sluice-gateway[local]')")
    from prometheus_client import CollectorRegistry

    from sluice.backends.registry import LocalProvider
    from sluice.settings import LocalDeployment

    spec = LocalDeployment(provider="local", defaults={"temperature": 0.5, "max_tokens": 100})
    backend = LocalProvider(CollectorRegistry()).build("x", spec)
    given = spec.defaults
    assert backend.defaults == RequestDefaults(  # type: ignore[attr-defined]
        temperature=given.temperature,
        top_p=given.top_p,
        top_k=given.top_k,
        max_tokens=given.max_tokens,
        system_prompt=given.system_prompt,
    )
    assert backend.defaults.temperature == 0.5  # type: ignore[attr-defined]
