"""Request parsing and validation for the OpenAI routes.

The gateway validates the fields it reads or that are cheap to check, naming the field in
the error (``param``) the way OpenAI does, and passes every other field through untouched.
Parsing is orjson on the raw body; no model objects are built on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from sluice.backends.base import Route
from sluice.errors import InvalidRequestError

Check = Callable[[Any], bool]


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


# Optional fields shared by chat and completions: (name, check, what it must be).
_SAMPLING: tuple[tuple[str, Check, str], ...] = (
    ("stream", lambda v: isinstance(v, bool), "a boolean"),
    ("max_tokens", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    ("n", lambda v: _is_int(v) and 1 <= v <= 128, "an integer from 1 to 128"),
    ("temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    ("top_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    ("seed", _is_int, "an integer"),
    (
        "stop",
        lambda v: isinstance(v, str) or (_is_str_list(v) and len(v) <= 4),
        "a string or a list of up to 4 strings",
    ),
    ("stream_options", lambda v: isinstance(v, dict), "an object"),
)

_CHAT: tuple[tuple[str, Check, str], ...] = (
    *_SAMPLING,
    ("max_completion_tokens", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
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
            "You must provide a model parameter." if model is None else "'model' must be a string.",
            param="model",
        )
    if route == "chat/completions":
        _check_messages(body.get("messages"))
        _check_optional(body, _CHAT)
    elif route == "completions":
        if not _is_token_input(body.get("prompt")):
            raise InvalidRequestError(
                "'prompt' is required: a string, a list of strings or a list of token ids.",
                param="prompt",
            )
        _check_optional(body, _SAMPLING)
    else:
        if not _is_token_input(body.get("input")):
            raise InvalidRequestError(
                "'input' is required: a non-empty string, list of strings or token ids.",
                param="input",
            )
        _check_optional(body, _EMBEDDINGS)
    options = body.get("stream_options")
    if options is not None and not isinstance(options.get("include_usage", False), bool):
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


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for a usage chunk at the end of its stream?"""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
