"""A batch's input checked whole: each bad line named, nothing queued."""

from __future__ import annotations

from typing import Any

import orjson

from sluice.batches.validate import MAX_ERRORS, check_input

ENDPOINT = "/v1/chat/completions"


def line(custom_id: str = "a", **body: Any) -> bytes:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return orjson.dumps(
        {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": request}
    )


def check(data: bytes, **limits: Any) -> tuple[list[Any], list[tuple[int | None, str]]]:
    options: dict[str, Any] = {
        "serves": lambda model: model in ("m", "secret"),
        "may_use": lambda model: model != "secret",
        "max_lines": 10,
        "max_line_bytes": 1000,
        **limits,
    }
    lines, errors = check_input(data, ENDPOINT, **options)
    return lines, [(e.line, e.code) for e in errors]


def test_good_lines_are_kept_in_order() -> None:
    lines, errors = check(line("a") + b"\n" + line("b") + b"\n")
    assert errors == []
    assert [(x.number, x.custom_id) for x in lines] == [(1, "a"), (2, "b")]


def test_each_bad_line_is_named_and_nothing_is_kept() -> None:
    data = b"\n".join(
        [
            line("a"),
            line("b", stream=True),
            line("c", model="secret"),  # served, not for this key
            line("d", n=0),  # the interactive validation's 400
            b'{"custom_id": "e", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
            b"",
            b"[1, 2]",
        ]
    )
    lines, errors = check(data)
    assert lines == []
    assert errors == [
        (2, "invalid_request"),
        (3, "model_not_found"),
        (4, "invalid_request"),
        (5, "invalid_method"),
        (6, "invalid_json_line"),
        (7, "invalid_request"),
    ]


def test_limits() -> None:
    assert check(b"\n".join([line(str(i)) for i in range(11)]))[1] == [(None, "too_many_lines")]
    assert check(b"\n" * 1_000_000)[1] == [(None, "too_many_lines")]  # counted, not split
    assert check(line("a", pad="x" * 2000))[1] == [(1, "line_too_large")]
    assert check(b"")[1] == [(None, "empty_file")]
    many = b"\n".join(b"{" for _ in range(MAX_ERRORS + 5))
    errors = check(many, max_lines=1000)[1]
    assert len(errors) == MAX_ERRORS + 1
    assert errors[-1] == (None, "too_many_errors")
