"""The engine's public value types: configuration, requests, events, errors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FinishReason = Literal["stop", "length"]


def _default_threads() -> int:
    return os.cpu_count() or 1


@dataclass(slots=True)
class EngineConfig:
    """How to load the model and how much work to run at once."""

    model_path: str | Path | None = None
    """A GGUF file; None means the packaged SmolLM2-135M-Instruct."""
    n_ctx: int = 2048
    """Context length of each sequence: prompt plus completion tokens."""
    parallel: int = 8
    """Sequence slots decoded together (continuous batching width)."""
    threads: int = field(default_factory=_default_threads)
    batch_size: int = 512
    """Most tokens in one decode step (prompt chunks plus one token per decoding slot)."""
    max_queue: int = 256
    """Most requests waiting for a slot; more are refused with `QueueFullError`."""
    max_queue_wait_s: float = 30.0
    """Longest a request may wait for a slot before `QueueTimeoutError`."""
    prefill_chunk: int | None = None
    """Most prompt tokens prefilled per step (None: as many as the batch has room for).
    Smaller chunks keep inter-token latency of running sequences low under long prompts."""

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be at least 16")
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.batch_size < self.parallel + 1:
            raise ValueError("batch_size must exceed parallel")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        if self.max_queue_wait_s <= 0:
            raise ValueError("max_queue_wait_s must be positive")


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
    """Higher is admitted first; equal priorities are served first come, first served."""


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
