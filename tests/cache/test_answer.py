"""Stored answers: their wire form, and serving a stream as a body and a body as a stream."""

from __future__ import annotations

import orjson
import pytest

from sluice.cache.answer import Answer, body_to_events, event_data, stream_to_body


def chunk(delta: dict[str, object], finish: str | None = None, index: int = 0) -> bytes:
    return b"data: " + orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        }
    )


STREAM = Answer(
    status=200,
    body=None,
    events=(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": " world"}),
        chunk({}, "stop"),
    ),
    prompt_tokens=3,
    completion_tokens=2,
    stored_at=10.0,
    expires_at=20.0,
    prompt="hi",
)


def test_wire_form_round_trips_and_refuses_foreign_bytes() -> None:
    assert Answer.from_bytes(STREAM.to_bytes()) == STREAM
    body = Answer(200, b'{"a":1}', None, 1, 2, 3.0, 4.0)
    assert Answer.from_bytes(body.to_bytes()) == body
    for bad in (b"", b"hello", STREAM.to_bytes()[:-5], b"SLC1\x00\x00\x00\x05{}{}{"):
        with pytest.raises(ValueError, match="cached answer"):
            Answer.from_bytes(bad)


def test_a_stream_adds_up_to_the_complete_object() -> None:
    body = orjson.loads(stream_to_body(STREAM, "chat/completions"))
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_tool_call_deltas_are_merged() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "add"}}
    events = (
        chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
    )
    answer = Answer(200, None, events, None, None, 0.0)
    message = orjson.loads(stream_to_body(answer, "chat/completions"))["choices"][0]["message"]
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1}'}}
    ]


def test_a_complete_answer_becomes_one_delta_per_chunk() -> None:
    body = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The capital is Paris."},
                "finish_reason": "stop",
            }
        ],
    }
    answer = Answer(200, orjson.dumps(body), None, 4, 5, 0.0)
    chunks = [event_data(e) for e in body_to_events(answer, "chat/completions")]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-2" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:-1]] == ["The ", "capital ", "is ", "Paris."]
    assert deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # And back: the same content.
    again = Answer(200, None, tuple(body_to_events(answer, "chat/completions")), 4, 5, 0.0)
    assert orjson.loads(stream_to_body(again, "chat/completions"))["choices"][0]["message"][
        "content"
    ] == ("The capital is Paris.")


def test_text_completions_convert_both_ways() -> None:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "a b", "finish_reason": "length"}]}  # fmt: skip
    answer = Answer(200, orjson.dumps(body), None, 1, 2, 0.0)
    events = tuple(body_to_events(answer, "completions"))
    assert [event_data(e)["choices"][0]["text"] for e in events] == ["a ", "b", ""]
    back = orjson.loads(stream_to_body(Answer(200, None, events, 1, 2, 0.0), "completions"))
    assert back["choices"][0]["text"] == "a b"
    assert back["choices"][0]["finish_reason"] == "length"
