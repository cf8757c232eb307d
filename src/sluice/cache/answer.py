"""A stored answer, and serving it in the form the client asked for.

An answer is kept as it came: a complete body as the upstream's bytes, a stream as its
events (each as the upstream framed it, usage-only chunks set aside: whether usage is sent
is the client's choice, `stream_options.include_usage`). Either serves either kind of
request: a stream's chunks are assembled into the complete object (`stream_to_body`), a
complete answer is cut into chunks of one delta each, usage last (`body_to_events`).

On the wire (the Redis tier) an answer is one byte string: a small JSON header, then the
blobs it names by length.
"""

from __future__ import annotations

import re
import struct
from typing import Any, NamedTuple

import orjson

from sluice.pipeline.sse import event_data

_FORMAT = b"SLC1"
_LENGTH = struct.Struct("!I")
# Text is cut after each run of spaces: a word per chunk, as a model streams (roughly).
_PIECES = re.compile(r"\S+\s*|\s+")
_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint")


class Answer(NamedTuple):
    """A named tuple: its fields are what the memory tier keeps as a plain tuple
    (`sluice.cache.tiers.MemoryTier`), and ``_make`` turns one back into an answer."""

    status: int
    body: bytes | None
    """A complete answer's bytes (or an error's); None for a stream."""
    events: tuple[bytes, ...] | None
    """A stream's events without their blank-line ends, ``[DONE]`` and usage chunks."""
    prompt_tokens: int | None
    completion_tokens: int | None
    stored_at: float
    """Wall-clock seconds: a request's ``max-age`` is measured from it."""
    expires_at: float = 0.0
    """Wall-clock seconds after which the answer is not served (0: not yet stored)."""
    content_type: str = "application/json"
    prompt: str | None = None
    """The last user turn, kept for the semantic cache's second check."""

    @classmethod
    def from_stream(
        cls,
        events: list[bytes],
        prompt_tokens: int | None,
        completion_tokens: int | None,
        prompt: str | None,
        stored_at: float,
    ) -> Answer:
        """A stream that ended with ``[DONE]``, as its events (usage-only chunk aside)."""
        return cls(
            200, None, tuple(events), prompt_tokens, completion_tokens, stored_at, prompt=prompt
        )

    @property
    def size(self) -> int:
        """Bytes the answer holds (its charge against the memory tier's budget)."""
        held = len(self.body) if self.body is not None else 0
        if self.events is not None:
            held += sum(len(event) for event in self.events)
        return held + (len(self.prompt) if self.prompt else 0) + 200

    def to_bytes(self) -> bytes:
        blobs = [self.body] if self.body is not None else list(self.events or ())
        header = {
            "status": self.status,
            "kind": "body" if self.body is not None else "stream",
            "n": len(blobs),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "stored_at": self.stored_at,
            "expires_at": self.expires_at,
            "content_type": self.content_type,
            "prompt": self.prompt,
        }
        head = orjson.dumps(header)
        parts = [_FORMAT, _LENGTH.pack(len(head)), head]
        for blob in blobs:
            parts += [_LENGTH.pack(len(blob)), blob]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Answer:
        """The answer ``to_bytes`` wrote; ValueError for anything else (a foreign or
        damaged value is a miss, never an answer)."""
        if not data.startswith(_FORMAT):
            raise ValueError("not a cached answer")
        try:
            offset = len(_FORMAT)
            blobs = []
            (length,) = _LENGTH.unpack_from(data, offset)
            header = orjson.loads(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
            for _ in range(int(header["n"])):
                (length,) = _LENGTH.unpack_from(data, offset)
                blob = data[offset + 4 : offset + 4 + length]
                if len(blob) != length:
                    raise ValueError("truncated cached answer")
                blobs.append(blob)
                offset += 4 + length
            is_body = header["kind"] == "body"
            return cls(
                status=int(header["status"]),
                body=blobs[0] if is_body else None,
                events=None if is_body else tuple(blobs),
                prompt_tokens=header["prompt_tokens"],
                completion_tokens=header["completion_tokens"],
                stored_at=float(header["stored_at"]),
                expires_at=float(header["expires_at"]),
                content_type=str(header["content_type"]),
                prompt=header["prompt"],
            )
        except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"damaged cached answer: {exc}") from None


def usage_event(first_event: bytes | None, prompt: int | None, completion: int | None) -> bytes:
    """The usage-only chunk a stream ends with when the client asked for usage
    (``stream_options.include_usage``), from the stored counts."""
    first = event_data(first_event) if first_event is not None else None
    chunk: dict[str, Any] = {}
    if isinstance(first, dict):
        for name in ("id", "object", "created", "model", "system_fingerprint"):
            if name in first:
                chunk[name] = first[name]
    chunk["choices"] = []
    prompt = prompt or 0
    completion = completion or 0
    chunk["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return b"data: " + orjson.dumps(chunk)


def stream_to_body(answer: Answer, route: str) -> bytes:
    """The complete object a stream's chunks add up to: each choice's text (or message
    content, tool calls and refusal) joined, its last finish reason, and the usage."""
    assert answer.events is not None
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for event in answer.events:
        chunk = event_data(event)
        if not isinstance(chunk, dict):
            continue
        if not head:
            head = {k: chunk[k] for k in _HEAD_FIELDS if k in chunk}
        for part in chunk.get("choices") or ():
            if isinstance(part, dict):
                _add_part(choices.setdefault(int(part.get("index") or 0), {}), part, route)
    body: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion" if route == "chat/completions" else "text_completion",
        "created": head.get("created", int(answer.stored_at)),
        "model": head.get("model", ""),
    }
    if "system_fingerprint" in head:
        body["system_fingerprint"] = head["system_fingerprint"]
    body["choices"] = [_finish_choice(index, choices[index], route) for index in sorted(choices)]
    if answer.prompt_tokens is not None or answer.completion_tokens is not None:
        prompt, completion = answer.prompt_tokens or 0, answer.completion_tokens or 0
        body["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return orjson.dumps(body)


def _add_part(choice: dict[str, Any], part: dict[str, Any], route: str) -> None:
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]
    logprobs = part.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        choice.setdefault("logprobs", []).extend(logprobs["content"])
    if route != "chat/completions":
        if isinstance(part.get("text"), str):
            choice["text"] = choice.get("text", "") + part["text"]
        return
    delta = part.get("delta")
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("role"), str):
        choice["role"] = delta["role"]
    for field in ("content", "refusal"):
        if isinstance(delta.get(field), str):
            choice[field] = choice.get(field, "") + delta[field]
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        calls = choice.setdefault("tool_calls", {})
        merged = calls.setdefault(int(call.get("index") or 0), {"function": {"arguments": ""}})
        for name in ("id", "type"):
            if call.get(name) is not None:
                merged[name] = call[name]
        function = call.get("function")
        if isinstance(function, dict):
            if function.get("name") is not None:
                merged["function"]["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                merged["function"]["arguments"] += function["arguments"]


def _finish_choice(index: int, choice: dict[str, Any], route: str) -> dict[str, Any]:
    logprobs = {"content": choice["logprobs"]} if "logprobs" in choice else None
    if route != "chat/completions":
        return {
            "index": index,
            "text": choice.get("text", ""),
            "logprobs": logprobs,
            "finish_reason": choice.get("finish_reason"),
        }
    message: dict[str, Any] = {
        "role": choice.get("role", "assistant"),
        "content": choice.get("content"),
    }
    if "refusal" in choice:
        message["refusal"] = choice["refusal"]
    if "tool_calls" in choice:
        message["tool_calls"] = [choice["tool_calls"][i] for i in sorted(choice["tool_calls"])]
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": choice.get("finish_reason"),
    }


def body_to_events(answer: Answer, route: str) -> list[bytes]:
    """A complete answer as stream chunks: per choice, the role, then one piece of text per
    chunk, each tool call, then the finish reason (usage is added by the caller)."""
    assert answer.body is not None
    body = orjson.loads(answer.body)
    head = {k: body[k] for k in _HEAD_FIELDS if k in body}
    head["object"] = "chat.completion.chunk" if route == "chat/completions" else "text_completion"
    events: list[bytes] = []

    def emit(index: int, part: dict[str, Any], finish: str | None = None) -> None:
        key = "delta" if route == "chat/completions" else "text"
        choice: dict[str, Any] = {"index": index, key: part if key == "delta" else part["text"]}
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        events.append(b"data: " + orjson.dumps({**head, "choices": [choice]}))

    for choice in body.get("choices") or ():
        index = int(choice.get("index") or 0)
        if route != "chat/completions":
            for piece in _PIECES.findall(choice.get("text") or ""):
                emit(index, {"text": piece})
            emit(index, {"text": ""}, choice.get("finish_reason"))
            continue
        message = choice.get("message") or {}
        emit(index, {"role": message.get("role", "assistant"), "content": ""})
        for piece in _PIECES.findall(message.get("content") or ""):
            emit(index, {"content": piece})
        if isinstance(message.get("refusal"), str):
            emit(index, {"refusal": message["refusal"]})
        for position, call in enumerate(message.get("tool_calls") or ()):
            emit(index, {"tool_calls": [{"index": position, **call}]})
        emit(index, {}, choice.get("finish_reason"))
    return events


def traits(answer: Answer) -> tuple[set[str], bool]:
    """Every choice's finish reason (``length``: cut short), and whether the answer calls
    tools (by its messages, not only its finish reason: some upstreams say ``stop``). A body
    that is not JSON is reported as ``unreadable``: it is not stored."""
    reasons: set[str] = set()
    tools = False
    if answer.body is not None:
        try:
            parsed = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return {"unreadable"}, False
        parts = [(c, c.get("message")) for c in _choices(parsed)]
    else:
        parts = []
        for event in answer.events or ():
            if b'"finish_reason"' in event or b"tool_calls" in event or b"function_call" in event:
                parts += [(c, c.get("delta")) for c in _choices(event_data(event))]
    for choice, message in parts:
        if isinstance(choice.get("finish_reason"), str):
            reasons.add(choice["finish_reason"])
        if isinstance(message, dict) and (
            message.get("tool_calls") or message.get("function_call")
        ):
            tools = True
    return reasons, tools


def _choices(parsed: Any) -> list[dict[str, Any]]:
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
