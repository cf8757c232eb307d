"""One request's state inside the engine, and the hand-off of its output to asyncio.

A `Sequence` is created on the event loop, queued, then owned by the decode thread once
admitted. Its only cross-thread traffic is `post()` (decode thread -> event loop, through
`call_soon_threadsafe`) and the `cancelled` flag (event loop -> decode thread).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import llama_cpp

from sluice.engine.text import StopMatcher, Utf8Assembler
from sluice.engine.types import (
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SequenceTiming,
    Usage,
)

Item = GenerationEvent | BaseException


def make_sampler(req: GenerationRequest) -> Any:
    """A llama.cpp sampler chain for `req`: greedy at temperature 0, else k, p, temp, dist."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if req.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if req.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(req.top_k))
    if req.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(req.top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(req.temperature))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if req.seed is None else req.seed & 0xFFFFFFFF
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


class Sequence:
    """A request on its way through the engine."""

    def __init__(self, req: GenerationRequest, order: int, loop: asyncio.AbstractEventLoop) -> None:
        self.req = req
        self.prompt = list(req.prompt_tokens)
        self.order = order
        self.loop = loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.ended_at = 0.0  # set on the consumer's side, when the last event is taken
        self.cancelled = False
        self.finished = False
        # Decode-thread state, set on admission.
        self.slot = -1
        self.sampler: Any = None
        self.cursor = 0
        """Prompt tokens already fed to the model (also the next position while prefilling)."""
        self.n_past = 0
        self.reused = 0
        """Prompt tokens taken from a KV cache (the slot's own or another slot's copied)."""
        self.source: Sequence | None = None
        """A sequence still prefilling a prompt that shares this one's first `share` tokens:
        this one waits for them and copies them instead of prefilling them again (n > 1)."""
        self.share = 0
        self.decoded: list[int] = []
        """Sampled tokens already fed back to the model (in the KV cache after the prompt)."""
        self.next_token = -1
        self.generated = 0
        self.batch_index = -1
        self.last_token_at = 0.0
        self._utf8 = Utf8Assembler()
        self._stops = StopMatcher(req.stop)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (-self.req.priority, self.order)

    @property
    def prefilling(self) -> bool:
        return self.cursor < len(self.prompt)

    def held(self) -> list[int]:
        """The tokens in this sequence's KV cells between steps (prompt so far, then output)."""
        return self.prompt[: self.cursor] + self.decoded

    def post(self, item: Item) -> None:
        """Hand `item` to the consumer's event loop now (safe from any thread)."""
        deliver(self.loop, [(self, item)])

    def accept(self, token: int, piece: bytes) -> tuple[str, bool]:
        """Take a sampled non-EOG token; return (text safe to emit, stop string hit)."""
        self.generated += 1
        self.next_token = token
        text = self._stops.feed(self._utf8.feed(piece))
        return text, self._stops.stopped

    def tail(self) -> str:
        """Text still held back, released when the sequence ends without a stop match."""
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._utf8.flush()) + self._stops.flush()

    def final_event(self, reason: FinishReason, text: str) -> GenerationEvent:
        self.finished = True
        usage = Usage(prompt_tokens=len(self.prompt), completion_tokens=self.generated)
        return GenerationEvent(text, self.generated, reason, usage)

    def fail(self, exc: BaseException) -> None:
        self.finished = True
        self.post(exc)

    def free_sampler(self) -> None:
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


def deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[Sequence, Item]]) -> None:
    """Queue `items` for their consumers on `loop` with one thread-safe wake-up."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the consumers' loop is closed: nobody is listening
        for seq, _ in items:
            seq.cancelled = True


def _put_all(items: list[tuple[Sequence, Item]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


class GenerationStream:
    """The consumer's end: an async iterator of events; closing it cancels the sequence.

    Leaving early (``aclose()``, a cancelled ``await``, or dropping the last reference) marks
    the sequence cancelled, and the decode thread frees its slot at the next step.
    """

    def __init__(self, seq: Sequence, cancel: Callable[[Sequence], None]) -> None:
        self._seq = seq
        self._cancel = cancel
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._seq.queue.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.finish_reason is not None:
            self._end()
        return item

    def _end(self) -> None:
        self._done = True
        self._seq.ended_at = time.monotonic()

    def timing(self) -> SequenceTiming:
        """The sequence's stages so far (a stream left early has no end yet: now)."""
        seq = self._seq
        return SequenceTiming(
            submitted=seq.submitted,
            admitted=seq.admitted_at,
            first_token=seq.first_token_at,
            ended=seq.ended_at or time.monotonic(),
            prompt_tokens=len(seq.prompt),
            reused_tokens=seq.reused,
            completion_tokens=seq.generated,
        )

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._cancel(self._seq)

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        # Lock-free on purpose (a finaliser may run on any thread): the decode thread
        # drops cancelled sequences on its next pass.
        if not self._done:
            self._seq.cancelled = True
