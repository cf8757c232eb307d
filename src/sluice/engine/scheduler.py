"""Continuous batching: the decode thread that owns the llama.cpp context.

Each step the thread (1) drops cancelled and expired requests, (2) admits waiting requests
into free sequence slots (highest priority first, then first come, first served), (3) builds
one `llama_batch` with one token for every decoding sequence plus chunks of prompt tokens
for sequences still prefilling (chunked prefill, so a long prompt never stalls decodes),
(4) runs one `llama_decode`, and (5) samples every sequence that produced logits with its
own sampler chain. A sequence that ends or is cancelled frees its slot in the same step.

Prompt caching (`cache_prompt`, like llama.cpp server's slot reuse): a finished or cancelled
sequence leaves its KV cells in its slot, and the scheduler remembers which tokens they hold.
A new request goes to the free slot whose kept tokens share the longest prefix with its
prompt; only the cache past that prefix is dropped (`llama_memory_seq_rm`) and prefill
starts there. At least the last prompt token is always decoded again, so that position
yields the logits of the first sampled token. A sequence that fails leaves nothing behind.

Kept cells are not free: every later decode step attends over them, which measurably
slowed batched decode when every slot kept its cache (a measurement taken before the batch
was laid out in slot order, which removed a slowdown of the same size; not re-examined
since; docs/architecture.md). So at most one free slot keeps its cells (the most recently
freed), and none while several sequences decode together: the cache serves sequential
traffic (and the shared system prompt) without taxing batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import llama_cpp

from sluice.engine.admission import Admission
from sluice.engine.metrics import EngineMetrics
from sluice.engine.model import LlamaModel
from sluice.engine.sequence import Item, Sequence, deliver, make_sampler
from sluice.engine.types import (
    DecodeError,
    EngineClosedError,
    EngineError,
    EngineStats,
    GenerationEvent,
)

log = logging.getLogger("sluice.engine")

StepObserver = Callable[[int, int, int], None]
"""Called after each step with (sequences, prompt tokens, decoded tokens)."""


class Scheduler:
    """Owns the model's context on one thread; everything else talks to it via `submit`."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        max_queue: int,
        max_queue_wait_s: float,
        prefill_chunk: int,
        cache_prompt: bool = True,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._model = model
        self._prefill_chunk = prefill_chunk
        self._cache_prompt = cache_prompt
        # Tokens held in the KV cache of each free slot (decode thread only; a running
        # sequence's own tokens are tracked on the sequence and stored here on release).
        self._cached: list[list[int]] = [[] for _ in range(model.n_seq)]
        self._kept: deque[int] = deque()  # free slots whose cells are kept, oldest first
        self._metrics = metrics
        if metrics is not None:
            metrics.kv_cells.set(model.n_seq * model.n_ctx)
        self._admission = Admission(
            model.n_seq, max_queue=max_queue, max_wait_s=max_queue_wait_s, metrics=metrics
        )
        self._batch: Any = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self._running: list[Sequence] = []  # decode thread only
        self._outbox: list[tuple[Sequence, Item]] = []  # decode thread only, flushed per step
        self.step_observers: list[StepObserver] = []
        self._thread = threading.Thread(target=self._run, name="sluice-decode", daemon=True)

    # -- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq_factory: Callable[[int], Sequence]) -> Sequence:
        """Queue a new sequence; raise `QueueFullError` at once when the queue is full."""
        return self._admission.submit(seq_factory)

    def cancel(self, seq: Sequence) -> None:
        self._admission.cancel(seq)

    def stats(self) -> EngineStats:
        running, waiting = self._admission.counts()
        slots = self._admission.slots
        return EngineStats(running, waiting, slots - running, slots)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (blocking); pending and running requests get `EngineClosedError`."""
        self._admission.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._batch is not None and not self._thread.is_alive():
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # -- decode thread ----------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException = EngineClosedError("engine closed")
        try:
            pick = self._pick_slot if self._cache_prompt else None
            while (
                admitted := self._admission.admit(idle=not self._running, pick=pick)
            ) is not None:
                for seq, slot in admitted:
                    seq.slot = slot
                    self._reuse_cache(seq)
                    seq.sampler = make_sampler(seq.req)
                    self._running.append(seq)
                self._release_cancelled()
                self._trim_kept()
                if self._running:
                    self._step()
        except BaseException as exc:
            log.exception("decode loop failed")
            error = EngineError(f"local engine failed: {exc}")
        finally:
            self._flush()
            for seq in self._admission.drain():
                seq.fail(error)
            for seq in list(self._running):
                self._release(seq, outcome="error")
                seq.fail(error)
            self._cached = [[] for _ in self._cached]
            if self._model.ctx:
                llama_cpp.llama_memory_clear(self._model.memory, True)

    # -- prompt cache ---------------------------------------------------------------------

    def _reusable(self, seq: Sequence, slot: int) -> int:
        """Leading prompt tokens already in `slot`'s cache (never the whole prompt)."""
        cached, prompt = self._cached[slot], seq.prompt
        limit = min(len(cached), len(prompt) - 1)
        n = 0
        while n < limit and cached[n] == prompt[n]:
            n += 1
        return n

    def _pick_slot(self, seq: Sequence, free: list[int]) -> int:
        """The free slot with the longest reusable prefix; else the least recently freed."""
        best, best_n = free[0], 0
        for slot in reversed(free):
            n = self._reusable(seq, slot)
            if n > best_n:
                best, best_n = slot, n
        return best

    def _reuse_cache(self, seq: Sequence) -> None:
        """Trim the new sequence's slot to the prefix it shares and start prefill after it."""
        slot, memory = seq.slot, self._model.memory
        n = self._reusable(seq, slot) if self._cache_prompt else 0
        if n > 0 and not llama_cpp.llama_memory_seq_rm(memory, slot, n, -1):
            n = 0  # this memory cannot drop a tail (e.g. recurrent): start over
        if n == 0 and self._cached[slot]:
            llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
        self._cached[slot] = []
        seq.cursor = seq.n_past = seq.reused = n
        if n and self._metrics:
            self._metrics.prompt_tokens_reused.inc(n)
        if slot in self._kept:
            self._kept.remove(slot)

    def _trim_kept(self) -> None:
        """Drop kept cells beyond one free slot, or all of them while several sequences run."""
        limit = 1 if len(self._running) <= 1 else 0
        while len(self._kept) > limit:
            slot = self._kept.popleft()
            if self._cached[slot]:
                llama_cpp.llama_memory_seq_rm(self._model.memory, slot, -1, -1)
                self._cached[slot] = []

    def _release_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq, outcome="cancelled")

    def _release(self, seq: Sequence, *, outcome: str) -> None:
        """Free the slot and the sampler of a sequence that is done.

        Its KV cells stay for the next request in the slot (prompt caching) unless it failed.
        """
        if self._cache_prompt and outcome != "error":
            self._cached[seq.slot] = seq.prompt[: seq.cursor] + seq.decoded
            self._kept.append(seq.slot)
        else:
            llama_cpp.llama_memory_seq_rm(self._model.memory, seq.slot, -1, -1)
            self._cached[seq.slot] = []
        seq.free_sampler()
        self._running.remove(seq)
        self._admission.release(seq.slot)
        if self._metrics:
            self._metrics.requests.labels(outcome).inc()

    def _step(self) -> None:
        batch = self._batch
        token, pos, n_seq_id, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        # Who takes part, decided in admission order: every decoding sequence (one token),
        # then prefilling ones (chunks of their prompts) while the batch has room.
        takes: list[tuple[Sequence, int]] = []
        decoded = 0
        for seq in self._running:
            seq.batch_index = -1
            if not seq.prefilling:
                takes.append((seq, 1))
                decoded += 1
        budget = min(self._prefill_chunk, self._model.n_batch - decoded)
        for seq in self._running:
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(budget, len(seq.prompt) - seq.cursor)
                takes.append((seq, take))
                budget -= take
        # Tokens go in in slot (sequence id) order: with one KV stream per sequence,
        # llama.cpp decodes a batch whose ids run backwards markedly slower, and prompt
        # caching's slot choice once produced that order (docs/architecture.md).
        takes.sort(key=_slot_of_take)
        n = 0
        in_batch: list[Sequence] = []
        for seq, take in takes:
            if not seq.prefilling:
                token[n], pos[n], n_seq_id[n], logits[n] = seq.next_token, seq.n_past, 1, 1
                seq_id[n][0] = seq.slot
                seq.batch_index = n
                seq.decoded.append(seq.next_token)
                seq.n_past += 1
                n += 1
            else:
                for tok in seq.prompt[seq.cursor : seq.cursor + take]:
                    token[n], pos[n], n_seq_id[n], logits[n] = tok, seq.cursor, 1, 0
                    seq_id[n][0] = seq.slot
                    seq.cursor += 1
                    n += 1
                seq.n_past = seq.cursor
                if not seq.prefilling:
                    logits[n - 1] = 1
                    seq.batch_index = n - 1
            in_batch.append(seq)
        batch.n_tokens = n
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._model.ctx, batch)
        elapsed = time.perf_counter() - started
        if rc != 0:
            for seq in in_batch:
                self._release(seq, outcome="error")
                seq.fail(DecodeError(f"llama_decode failed with status {rc}"))
            return
        if self._metrics:
            self._metrics.observe_step(
                sequences=len(in_batch),
                prompt_tokens=n - decoded,
                decode_tokens=decoded,
                seconds=elapsed,
                kv_cells_used=self._kv_cells_used(),
            )
        for observe in self.step_observers:
            observe(len(in_batch), n - decoded, decoded)
        for seq in in_batch:
            if seq.batch_index >= 0:
                self._sample(seq)
        self._flush()

    def _kv_cells_used(self) -> int:
        held = sum(seq.n_past for seq in self._running)
        return held + sum(len(self._cached[slot]) for slot in self._kept)

    def _flush(self) -> None:
        """Deliver this step's events: one wake-up per consumer event loop, not per token."""
        if not self._outbox:
            return
        groups: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Item]]] = {}
        for seq, item in self._outbox:
            groups.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in groups.items():
            deliver(loop, items)

    def _sample(self, seq: Sequence) -> None:
        model = self._model
        tok = int(llama_cpp.llama_sampler_sample(seq.sampler, model.ctx, seq.batch_index))
        now = time.monotonic()
        if seq.generated == 0:
            seq.first_token_at = now
        if self._metrics:
            self._metrics.generated_tokens.inc()
            if seq.generated == 0:
                self._metrics.ttft.observe(now - seq.submitted)
            else:
                self._metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if model.is_eog(tok):
            seq.generated += 1
            self._release(seq, outcome="stop")
            self._outbox.append((seq, seq.final_event("stop", seq.tail())))
            return
        text, stopped = seq.accept(tok, model.token_to_piece(tok))
        if stopped:
            self._release(seq, outcome="stop")
            self._outbox.append((seq, seq.final_event("stop", text)))
        elif seq.generated >= seq.req.max_tokens or seq.n_past >= model.n_ctx:
            self._release(seq, outcome="length")
            self._outbox.append((seq, seq.final_event("length", text + seq.tail())))
        elif text:
            self._outbox.append((seq, GenerationEvent(text, seq.generated)))


def _slot_of_take(take: tuple[Sequence, int]) -> int:
    return take[0].slot
