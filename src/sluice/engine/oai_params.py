"""Turn an OpenAI chat/completions request body into engine requests, validating each field.

Every refusal is an `InvalidRequestError` naming the offending field (``param``), or a
`ContextLengthExceededError` when prompt plus completion do not fit a sequence's context.
Fields the local model cannot honour but that do not change the answer's shape
(penalties, ``user``, ``response_format``…) are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sluice.engine.types import GenerationRequest
from sluice.errors import ContextLengthExceededError, InvalidRequestError

Kind = Literal["chat", "text"]
MAX_N = 128
MAX_STOPS = 4
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class Tokenizer(Protocol):
    @property
    def n_ctx(self) -> int: ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...


@dataclass(slots=True)
class Job:
    """A parsed request: one engine request per choice, in choice-index order."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    """Usage's prompt_tokens: each distinct prompt counted once (not once per choice)."""
    requests: list[GenerationRequest] = field(default_factory=list)


def parse(kind: Kind, body: Mapping[str, Any], tok: Tokenizer) -> Job:
    """Validate `body` and build the engine requests for every choice."""
    if kind == "chat":
        prompts = [tok.tokenize_chat(_messages(body))]
        prompt_param = "messages"
    else:
        prompts = _prompts(body, tok)
        prompt_param = "prompt"
    n = _int(body, "n", 1, low=1, high=MAX_N)
    temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
    if top_p == 0.0:
        raise InvalidRequestError("top_p must be greater than 0", param="top_p")
    top_k = _int(body, "top_k", 0, low=0)
    seed = _optional_int(body, "seed")
    stop = _stop(body)
    priority = _int(body, "priority", 0)
    stream = _bool(body, "stream", False)
    include_usage = _include_usage(body, stream)
    for name in ("logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise InvalidRequestError(f"{name} is not supported by this model", param=name)
    if body.get("tools"):
        raise InvalidRequestError("tools are not supported by this model", param="tools")
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_param = "max_completion_tokens"
    else:
        max_param = "max_tokens"
    requested = _optional_int(body, max_param, low=1)
    job = Job(kind, str(body.get("model") or ""), stream, include_usage, 0)
    for prompt in prompts:
        max_tokens = requested if requested is not None else tok.n_ctx - len(prompt)
        if len(prompt) + max(max_tokens, 1) > tok.n_ctx:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {tok.n_ctx} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                f"{prompt_param}, {max_tokens} in the completion). Please reduce the length "
                f"of the {prompt_param} or completion.",
                param=prompt_param,
            )
        job.prompt_tokens += len(prompt)
        for j in range(n):
            job.requests.append(
                GenerationRequest(
                    prompt_tokens=prompt,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    # Distinct choices need distinct draws, reproducibly under one seed.
                    seed=None if seed is None else seed + j,
                    stop=stop,
                    priority=priority,
                )
            )
    return job


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise InvalidRequestError(
                f"messages[{i}] must be an object with a valid role", param=f"messages[{i}].role"
            )
        out.append({**message, "content": _content(message.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequestError(
                    "only text content parts are supported by this model",
                    param=f"messages[{i}].content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequestError(
        "content must be a string or an array of parts", param=f"messages[{i}].content"
    )


def _prompts(body: Mapping[str, Any], tok: Tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [tok.tokenize(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tok.tokenize(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise InvalidRequestError(
            "prompt must be a string, an array of strings, or token arrays", param="prompt"
        )
    if any(not p for p in prompts):
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return prompts


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise InvalidRequestError(f"stop accepts at most {MAX_STOPS} strings", param="stop")
        return tuple(s for s in stop if s)
    raise InvalidRequestError("stop must be a string or an array of strings", param="stop")


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    if not stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise InvalidRequestError(
            "include_usage must be a boolean", param="stream_options.include_usage"
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(
    body: Mapping[str, Any], name: str, *, low: int | None = None, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequestError(f"{name} must be {bounds}", param=name)
    return int(value)


def _int(
    body: Mapping[str, Any],
    name: str,
    default: int,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int:
    value = _optional_int(body, name, low=low, high=high)
    return default if value is None else value


def _number(
    body: Mapping[str, Any], name: str, default: float, *, low: float, high: float
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low:g} and {high:g}", param=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean", param=name)
    return value
