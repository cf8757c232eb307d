"""A batch's input file, checked whole when the batch is created.

Every line must be a JSON object ``{"custom_id", "method": "POST", "url", "body"}`` whose
``url`` is the batch's endpoint, whose ``custom_id`` is a string unique in the file, and
whose body is a request that endpoint would accept (the same validation as an interactive
request, `sluice.protocol.validate`) for a model the gateway serves and the key may use.
A file with any bad line is refused as a whole at creation, each error naming its line
(1-based): the client learns at once, not hours later when the line's turn comes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.backends.base import Route
from sluice.errors import SluiceError
from sluice.protocol import validate

ENDPOINTS: dict[str, Route] = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
MAX_CUSTOM_ID = 512
MAX_ERRORS = 100
"""Errors reported for one file (the rest are counted in the last one)."""


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    custom_id: str
    body: bytes
    """The request body as JSON text (re-encoded: what the pipeline will read)."""


@dataclass(frozen=True, slots=True)
class LineError:
    line: int | None
    code: str
    message: str
    param: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def check_input(
    data: bytes,
    endpoint: str,
    *,
    serves: Callable[[str], bool],
    may_use: Callable[[str], bool],
    max_lines: int,
    max_line_bytes: int,
) -> tuple[list[Line], list[LineError]]:
    """The lines of ``data`` and, when any is bad, the errors (then no line may run)."""
    route = ENDPOINTS[endpoint]
    lines: list[Line] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    # Counted before the file is cut into lines: a file of a million empty lines must not
    # become a million objects first.
    count = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if count > max_lines:
        return [], [
            LineError(
                None,
                "too_many_lines",
                f"The input file has {count} lines; at most {max_lines} are allowed.",
            )
        ]
    raw_lines = data.split(b"\n")
    if raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()  # the newline that ends the last line
    if not raw_lines:
        return [], [LineError(None, "empty_file", "The input file has no lines.")]
    if len(raw_lines) > max_lines:
        return [], [
            LineError(
                None,
                "too_many_lines",
                f"The input file has {len(raw_lines)} lines; at most {max_lines} are allowed.",
            )
        ]
    for number, raw in enumerate(raw_lines, start=1):
        problem = _check_line(number, raw, endpoint, route, seen, serves, may_use, max_line_bytes)
        if isinstance(problem, LineError):
            errors.append(problem)
            if len(errors) >= MAX_ERRORS:
                errors.append(
                    LineError(None, "too_many_errors", f"Stopped after {MAX_ERRORS} errors.")
                )
                break
        elif not errors:
            lines.append(problem)
    return ([], errors) if errors else (lines, [])


def _check_line(
    number: int,
    raw: bytes,
    endpoint: str,
    route: Route,
    seen: set[str],
    serves: Callable[[str], bool],
    may_use: Callable[[str], bool],
    max_line_bytes: int,
) -> Line | LineError:
    if len(raw) > max_line_bytes:
        return LineError(
            number, "line_too_large", f"The line is larger than {max_line_bytes} bytes."
        )
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(number, "invalid_json_line", f"The line is not valid JSON ({exc.msg}).")
    if not isinstance(item, dict):
        return LineError(number, "invalid_request", "The line must be a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return LineError(
            number,
            "invalid_request",
            f"'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID} characters.",
            "custom_id",
        )
    if "\x00" in custom_id:
        return LineError(number, "invalid_request", "'custom_id' holds a NUL.", "custom_id")
    if custom_id in seen:
        return LineError(
            number, "duplicate_custom_id", f"The custom_id {custom_id!r:.80} is used twice."
        )
    seen.add(custom_id)
    if item.get("method") != "POST":
        return LineError(number, "invalid_method", "'method' must be \"POST\".", "method")
    if item.get("url") != endpoint:
        return LineError(
            number,
            "mismatched_url",
            f"'url' must be the batch's endpoint, {endpoint!r}.",
            "url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_request", "'body' must be a JSON object.", "body")
    try:
        model = validate(route, body)
    except SluiceError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        return LineError(number, "invalid_request", exc.message, param)
    if body.get("stream") is True:
        return LineError(number, "invalid_request", "A batch line cannot stream.", "body.stream")
    if not serves(model) or not may_use(model):
        return LineError(
            number,
            "model_not_found",
            f"The model {model[:200]!r} does not exist or you do not have access to it.",
            "body.model",
        )
    return Line(number, custom_id, orjson.dumps(body))
