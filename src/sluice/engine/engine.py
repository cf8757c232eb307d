"""The engine's async face: load the model, submit generations, read back events.

Nothing here blocks the event loop on llama.cpp: loading and shutdown run in a worker
thread, decoding runs on the scheduler's own thread, large prompts are tokenized on the
engine's tokenizer thread (`offload`), and events come back through `call_soon_threadsafe`.
The engine is not bound to one event loop; each request is answered on the loop that
called `generate`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sluice.engine.config import EngineConfig
from sluice.engine.metrics import EngineMetrics
from sluice.engine.model import LlamaModel, default_model_path
from sluice.engine.scheduler import BatchObserver, Scheduler, StepObserver
from sluice.engine.sequence import GenerationStream
from sluice.engine.sequence import Sequence as _Sequence
from sluice.engine.types import (
    EngineClosedError,
    EngineStats,
    GenerationRequest,
    PromptTooLongError,
    RequestLimits,
)

T = TypeVar("T")


class Engine:
    """A continuously batched llama.cpp model serving many sequences at once."""

    def __init__(self, config: EngineConfig, metrics: EngineMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._model: LlamaModel | None = None
        self._scheduler: Scheduler | None = None
        self._tokenizer: ThreadPoolExecutor | None = None

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
            step_tokens=cfg.step_tokens,
            cache_prompt=cfg.cache_prompt,
            metrics=self.metrics,
        )
        scheduler.start()
        # One thread: large prompts queue behind each other there, never on the event loop
        # and never in the default executor other parts of the app share.
        self._tokenizer = ThreadPoolExecutor(1, thread_name_prefix="sluice-tokenize")
        self._model, self._scheduler = model, scheduler

    async def close(self) -> None:
        """Stop the decode thread (failing whatever is in flight) and free the model."""
        scheduler, model, tokenizer = self._scheduler, self._model, self._tokenizer
        self._scheduler = self._tokenizer = None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop)
        if tokenizer is not None:
            # A tokenization still running reads the vocabulary: it must end before the
            # model is freed (llama-server crashed on exactly this, unloading mid-tokenize).
            await asyncio.to_thread(tokenizer.shutdown, wait=True, cancel_futures=True)
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

    @property
    def request_limits(self) -> RequestLimits:
        """The bounds an OpenAI request is checked against before it is tokenized."""
        model = self.model
        return RequestLimits(
            n_ctx=model.n_ctx,
            n_vocab=model.n_vocab,
            max_sequences=self.config.max_sequences_per_request,
            max_prompt_chars=model.n_ctx * model.max_token_bytes,
            special_texts=model.special_texts,
        )

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (tokenizing, rendering a chat) on the engine's tokenizer thread."""
        executor = self._tokenizer
        if executor is None:
            raise EngineClosedError("engine is not started")
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except RuntimeError as exc:  # shut down between the check and the submit
            raise EngineClosedError("engine is shutting down") from exc
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:  # `close` cancelled the work
                raise EngineClosedError("engine is shutting down") from None
            raise

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Tokens of plain text (a completion prompt), with BOS if the model wants one.

        ``parse_special`` reads special-token text (a rendered chat's ``<|im_start|>``) as
        those tokens; never set it for a client's own text."""
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

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

    def add_batch_observer(self, observer: BatchObserver) -> None:
        """Call `observer([(slot, tokens), ...])` with each step's batch, in batch order.

        It runs on the decode thread before the decode: keep it tiny and thread-safe.
        """
        self._require().batch_observers.append(observer)

    def remove_batch_observer(self, observer: BatchObserver) -> None:
        self._require().batch_observers.remove(observer)

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
        tokens = request.prompt_tokens
        if min(tokens) < 0 or max(tokens) >= model.n_vocab:
            raise ValueError("prompt contains a token id outside the vocabulary")
