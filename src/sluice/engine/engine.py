"""The engine's async face: load the model, submit generations, read back events.

Nothing here blocks the event loop on llama.cpp: loading and shutdown run in a worker
thread, decoding runs on the scheduler's own thread, and events come back through
`call_soon_threadsafe`. The engine is not bound to one event loop; each request is
answered on the loop that called `generate`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sluice.engine.config import EngineConfig
from sluice.engine.metrics import EngineMetrics
from sluice.engine.model import LlamaModel, default_model_path
from sluice.engine.scheduler import Scheduler, StepObserver
from sluice.engine.sequence import GenerationStream
from sluice.engine.sequence import Sequence as _Sequence
from sluice.engine.types import (
    EngineClosedError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
)


class Engine:
    """A continuously batched llama.cpp model serving many sequences at once."""

    def __init__(self, config: EngineConfig, metrics: EngineMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._model: LlamaModel | None = None
        self._scheduler: Scheduler | None = None

    @property
    def model_path(self) -> Path:
        path = self.config.model_path
        return Path(path) if path is not None else default_model_path()

    async def start(self) -> None:
        """Load the model and start the decode thread (idempotent)."""
        if self._scheduler is not None:
            return
        cfg = self.config
        model = await asyncio.to_thread(
            LlamaModel,
            self.model_path,
            n_ctx=cfg.n_ctx,
            n_batch=cfg.batch_size,
            n_seq=cfg.parallel,
            n_threads=cfg.n_threads,
        )
        scheduler = Scheduler(
            model,
            max_queue=cfg.max_queue,
            max_queue_wait_s=cfg.max_queue_wait_s,
            prefill_chunk=cfg.prefill_chunk or cfg.batch_size,
            cache_prompt=cfg.cache_prompt,
            metrics=self.metrics,
        )
        scheduler.start()
        self._model, self._scheduler = model, scheduler

    async def close(self) -> None:
        """Stop the decode thread (failing whatever is in flight) and free the model."""
        scheduler, model = self._scheduler, self._model
        self._scheduler = None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        if model is not None:
            model.close()
            self._model = None

    @property
    def started(self) -> bool:
        return self._scheduler is not None

    @property
    def model(self) -> LlamaModel:
        if self._model is None:
            raise EngineClosedError("engine is not started")
        return self._model

    @property
    def n_ctx(self) -> int:
        """Most tokens (prompt plus completion) one sequence may hold."""
        return self.model.n_ctx

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokens of plain text (a completion prompt), with BOS if the model wants one."""
        return self.model.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for a conversation, from the model's own chat template."""
        return self.model.render_chat(messages)

    def tokenize_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Tokens of the rendered conversation (the prompt_tokens of its usage)."""
        return self.model.tokenize_chat(messages)

    def stats(self) -> EngineStats:
        if self._scheduler is None:
            return EngineStats(0, 0, 0, self.config.parallel)
        return self._scheduler.stats()

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call `observer(sequences, prompt_tokens, decoded_tokens)` after every step.

        It runs on the decode thread: keep it tiny and thread-safe.
        """
        self._require().step_observers.append(observer)

    def remove_step_observer(self, observer: StepObserver) -> None:
        self._require().step_observers.remove(observer)

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Queue `request`; iterate the result for its events (the last has finish_reason).

        Raises at once: `PromptTooLongError` / `ValueError` for a request that cannot run,
        `QueueFullError` when the waiting queue is full, `EngineClosedError` when stopped.
        Iterating may raise `QueueTimeoutError`, `DecodeError` or `EngineClosedError`.
        Closing the stream early (or cancelling the task reading it) cancels the sequence.
        """
        scheduler = self._require()
        model = self.model
        self._validate(request, model)
        loop = asyncio.get_running_loop()
        seq = scheduler.submit(lambda order: _Sequence(request, order, loop))
        return GenerationStream(seq, scheduler.cancel)

    def _require(self) -> Scheduler:
        if self._scheduler is None:
            raise EngineClosedError("engine is not started")
        return self._scheduler

    @staticmethod
    def _validate(request: GenerationRequest, model: LlamaModel) -> None:
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            raise ValueError("prompt must contain at least one token")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n_prompt + request.max_tokens > model.n_ctx:
            raise PromptTooLongError(
                f"this model's maximum context length is {model.n_ctx} tokens, but "
                f"{n_prompt + request.max_tokens} were requested ({n_prompt} in the prompt, "
                f"{request.max_tokens} for the completion)"
            )
        if any(t < 0 or t >= model.n_vocab for t in request.prompt_tokens):
            raise ValueError("prompt contains a token id outside the vocabulary")
