"""Configuration of the local engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class EngineConfig:
    """How to load the model and how much work to run at once."""

    model_path: str | Path | None = None
    """A GGUF file; None means the packaged SmolLM2-135M-Instruct."""
    n_ctx: int = 2048
    """Context length of each sequence: prompt plus completion tokens."""
    parallel: int = 8
    """Sequence slots decoded together (continuous batching width)."""
    threads: int | None = None
    """CPU threads for llama.cpp; None means every core (`os.cpu_count()`)."""
    batch_size: int = 512
    """Most tokens in one decode step (prompt chunks plus one token per decoding slot)."""
    max_queue: int = 256
    """Most requests waiting for a slot; more are refused with `QueueFullError`."""
    max_queue_wait_s: float = 30.0
    """Longest a request may wait for a slot before `QueueTimeoutError`."""
    prefill_chunk: int | None = None
    """Most prompt tokens prefilled per step (None: as many as the token budget leaves)."""
    step_tokens: int | None = None
    """Most tokens in one decode step (as vLLM's ``max_num_batched_tokens``): one token for
    each decoding sequence first, then prompt chunks up to the cap, so a long prompt joins a
    little each step instead of stalling running streams. None: the adaptive budget of
    `sluice.engine.budget` (twice the decoding sequences, at least 16, and a prompt that
    fits in that joins whole). Set, it must exceed `parallel` so that prompts always make
    progress."""
    cache_prompt: bool = True
    """Keep a finished sequence's KV cache in its slot and reuse its longest common prefix
    with the next prompt admitted there, prefilling only the new suffix."""
    max_sequences_per_request: int = 16
    """Most sequences one OpenAI request may expand into (prompts x ``n``); more is a 400
    before anything is tokenized or queued."""

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be at least 16")
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.batch_size < self.parallel + 1:
            raise ValueError("batch_size must exceed parallel")
        if self.max_queue < 0:
            raise ValueError("max_queue must not be negative")
        if self.step_tokens is not None and self.step_tokens <= self.parallel:
            raise ValueError("step_tokens must exceed parallel")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        if self.max_sequences_per_request < 1:
            raise ValueError("max_sequences_per_request must be at least 1")
        if self.max_queue_wait_s <= 0:
            raise ValueError("max_queue_wait_s must be positive")

    @property
    def n_threads(self) -> int:
        return self.threads if self.threads is not None else (os.cpu_count() or 1)
