"""Request parsing and validation for the OpenAI routes.

The gateway validates the fields it reads or that are cheap to check, naming the field in
the error (``param``) the way OpenAI does, and passes every other field through untouched.
Parsing is orjson on the raw body; no model objects are built on the hot path.

The fields that size a request's reservation (``max_tokens``, ``max_completion_tokens``,
``n``, ``best_of``, the prompts) are integers within OpenAI's bounds or the request is
refused, so `completion_ceiling` can never be talked below what the upstream may produce:
a boolean, a float, a string or an integer past the bound is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from sluice.backends.base import Route
from sluice.errors import InvalidRequestError

Check = Callable[[Any], bool]

MAX_N = 128
"""Choices per prompt (``n``, ``best_of``)."""
MAX_TOKENS = 2**31 - 1
"""The largest ``max_tokens`` / ``max_completion_tokens``: OpenAI's and vLLM's int32."""
SEED_RANGE = (-(2**63), 2**63 - 1)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode the body; anything but a JSON object is a 400."""
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc.msg} at position {exc.pos})."
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return parsed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _is_token_input(v: Any) -> bool:
    """A string, list of strings, list of token ids, or list of token-id lists (non-empty)."""
    if isinstance(v, str):
        return True
    if not isinstance(v, list) or not v:
        return False
    return _is_str_list(v) or _is_int_list(v) or all(_is_int_list(x) and x for x in v)


def _is_token_count(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= MAX_TOKENS


def _is_choice_count(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= MAX_N


# Optional fields shared by chat and completions: (name, check, what it must be).
_SAMPLING: tuple[tuple[str, Check, str], ...] = (
    ("stream", lambda v: isinstance(v, bool), "a boolean"),
    ("max_tokens", _is_token_count, f"an integer from 1 to {MAX_TOKENS}"),
    # Not OpenAI's on /v1/completions, but an upstream may honour it there too: it sizes
    # the reservation on both routes.
    ("max_completion_tokens", _is_token_count, f"an integer from 1 to {MAX_TOKENS}"),
    ("n", _is_choice_count, f"an integer from 1 to {MAX_N}"),
    ("temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    ("top_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    (
        "seed",
        lambda v: _is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1],
        "a 64-bit signed integer",
    ),
    (
        "stop",
        lambda v: isinstance(v, str) or (_is_str_list(v) and len(v) <= 4),
        "a string or a list of up to 4 strings",
    ),
    ("stream_options", lambda v: isinstance(v, dict), "an object"),
)

_COMPLETIONS: tuple[tuple[str, Check, str], ...] = (
    *_SAMPLING,
    # Candidates generated upstream (and billed) for each prompt, of which n are returned.
    ("best_of", _is_choice_count, f"an integer from 1 to {MAX_N}"),
)

_EMBEDDINGS: tuple[tuple[str, Check, str], ...] = (
    ("encoding_format", lambda v: v in ("float", "base64"), "'float' or 'base64'"),
    ("dimensions", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
)


def validate(route: Route, body: dict[str, Any]) -> str:
    """Check the request for ``route``; return its model name."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError(
            "You must provide a model parameter."
            if model is None
            else "'model' must be a non-empty string.",
            param="model",
        )
    if route == "chat/completions":
        _check_messages(body.get("messages"))
        _check_optional(body, _SAMPLING)
    elif route == "completions":
        if not _is_token_input(body.get("prompt")):
            raise InvalidRequestError(
                "'prompt' is required: a string, a list of strings or a list of token ids.",
                param="prompt",
            )
        _check_optional(body, _COMPLETIONS)
    else:
        if not _is_token_input(body.get("input")):
            raise InvalidRequestError(
                "'input' is required: a non-empty string, list of strings or token ids.",
                param="input",
            )
        _check_optional(body, _EMBEDDINGS)
    options = body.get("stream_options")
    if options is None:
        return model
    if not isinstance(options, dict):  # the one check an embeddings request gets
        raise InvalidRequestError("'stream_options' must be an object.", param="stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise InvalidRequestError(
            "'stream_options.include_usage' must be a boolean.",
            param="stream_options.include_usage",
        )
    return model


def _check_optional(body: dict[str, Any], rules: tuple[tuple[str, Check, str], ...]) -> None:
    for name, check, expected in rules:
        value = body.get(name)
        if value is not None and not check(value):
            raise InvalidRequestError(f"'{name}' must be {expected}.", param=name)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "'messages' is required and must be a non-empty array.", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"'messages[{i}]' must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"'messages[{i}].role' is required and must be a string.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"'messages[{i}].content' must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )


def completion_ceiling(route: str, body: dict[str, Any], default: int) -> tuple[int, bool]:
    """The most completion tokens a request that passed `validate` can make the upstream
    produce: the larger of ``max_tokens`` and ``max_completion_tokens`` (an upstream may
    honour either), else ``default``, for each choice: ``n`` (or ``best_of``, the
    candidates generated) for every prompt. Embeddings produce none.

    And whether the client set a ceiling the upstream honours (legacy completions know only
    ``max_tokens``): when it did not, nothing stops the upstream from writing more than
    ``default`` unless the gateway sends it that ceiling."""
    if route == "embeddings":
        return 0, True
    limit: int | None = body.get("max_tokens")
    explicit = limit is not None
    other: int | None = body.get("max_completion_tokens")
    if other is not None:
        explicit = explicit or route == "chat/completions"
        if limit is None or other > limit:
            limit = other
    choices: int = body.get("n") or 1
    if route == "completions":
        best_of: int | None = body.get("best_of")
        if best_of is not None and best_of > choices:
            choices = best_of
        choices *= _prompt_count(body["prompt"])
    return (default if limit is None else limit) * choices, explicit


def _prompt_count(prompt: Any) -> int:
    """Prompts in a validated ``prompt``: a string or a token-id list is one."""
    if isinstance(prompt, str) or _is_int(prompt[0]):
        return 1
    return len(prompt)


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for a usage chunk at the end of its stream?"""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
