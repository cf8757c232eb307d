"""Shape engine output as OpenAI objects: completions, stream chunks (SSE), usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from sluice.backends.local_params import Job

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class Renderer:
    """Builds the response objects of one job (one id and one timestamp for all of them)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.chat = job.kind == "chat"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.job.prompt_tokens + completion_tokens,
        }

    def completion(self, choices: list[Choice]) -> bytes:
        """The whole (non-streaming) answer."""
        out: list[dict[str, Any]] = []
        for index, choice in enumerate(choices):
            text = "".join(choice.text)
            if self.chat:
                out.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                out.append(
                    {
                        "text": text,
                        "index": index,
                        "logprobs": None,
                        "finish_reason": choice.finish_reason,
                    }
                )
        body = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": out,
            "usage": self.usage(sum(c.completion_tokens for c in choices)),
        }
        return orjson.dumps(body)

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
        }
        if self.job.include_usage:
            body["usage"] = None
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role_chunk(self, index: int) -> bytes:
        """A chat stream's first chunk for a choice (empty for text completions)."""
        if not self.chat:
            return b""
        delta = {"role": "assistant", "content": "", "refusal": None}
        return self._chunk(
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def text_chunk(self, index: int, text: str, finish_reason: str | None = None) -> bytes:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None}
        else:
            choice = {"text": text, "index": index, "logprobs": None}
        choice["finish_reason"] = finish_reason
        return self._chunk([choice])

    def usage_chunk(self, completion_tokens: int) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.job.model,
            "choices": [],
            "usage": self.usage(completion_tokens),
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"
