"""The engine's public value types: requests, events, timings, stats, errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate."""

    prompt_tokens: Sequence[int]
    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    seed: int | None = None
    """None means a random seed."""
    stop: Sequence[str] = ()
    priority: int = 0
    """Higher is admitted first; equal priorities are served first come, first served.
    The OpenAI surface takes it from the caller's key, never from the request body."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one OpenAI request may ask of the engine, checked before any tokenization."""

    n_ctx: int
    """Most tokens (prompt plus completion) of one sequence."""
    n_vocab: int
    max_sequences: int
    """Most sequences (prompts x n) one request may expand into."""
    max_prompt_chars: int
    """A prompt text longer than this cannot fit `n_ctx` tokens (`n_ctx` times the
    longest token's bytes), so it is refused without tokenizing it."""
    special_texts: tuple[str, ...] = ()
    """The text of the model's special tokens (``<|im_start|>``…): a rendered chat is
    tokenized with them parsed, which costs llama.cpp time quadratic in how many occur,
    so a chat holding more of them than `n_ctx` is refused before it is tokenized."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A piece of output. The last event of a sequence carries finish_reason and usage."""

    text: str
    """New text since the previous event (may be empty)."""
    tokens: int
    """Completion tokens generated so far."""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class SequenceTiming:
    """When a sequence went through the engine's stages (``time.monotonic()``; 0.0 for a
    stage it never reached), for tracing."""

    submitted: float
    admitted: float
    first_token: float
    ended: float
    prompt_tokens: int
    reused_tokens: int
    completion_tokens: int


class SequenceTracer(Protocol):
    """What records a sequence's stages as trace spans (`sluice.observability.tracing`)."""

    def capture(self) -> object | None:
        """The caller's trace context, or None when nothing is being recorded."""

    def record(self, parent: object, timing: SequenceTiming) -> None:
        """Spans for ``timing``'s queue wait and decode, children of ``parent``."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    free_slots: int
    slots: int


class EngineError(RuntimeError):
    """Base of the engine's own failures (mapped to HTTP errors by the backend adapter)."""


class EngineClosedError(EngineError):
    """The engine is not started, or is shutting down."""


class QueueFullError(EngineError):
    """The waiting queue is at its limit."""


class QueueTimeoutError(EngineError):
    """A request waited longer than `max_queue_wait_s` for a slot."""


class PromptTooLongError(EngineError, ValueError):
    """Prompt plus max_tokens do not fit the context of a sequence."""


class DecodeError(EngineError):
    """llama_decode failed."""
