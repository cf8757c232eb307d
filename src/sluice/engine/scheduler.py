"""Continuous batching: the decode thread that owns the llama.cpp context.

Each step the thread (1) drops cancelled and expired requests, (2) admits waiting requests
into free sequence slots (highest priority first, then first come, first served; next to
the busy slots), (3) builds one `llama_batch` within a token budget: one token for every
decoding sequence first, then prompt tokens for sequences still prefilling, the shortest
rest of a prompt first (a short prompt whole, a long one a chunk each step, so that it
neither stalls the running streams nor the short prompts behind it for long), (4) runs one
`llama_decode`, and (5) samples every sequence that produced logits with its own
sampler chain. A sequence that ends or is cancelled frees its slot in the same step.

Slot order. The context keeps one KV stream per slot, and llama.cpp splits a batch into runs
of consecutive sequence ids, one forward pass per run: tokens go in in slot order and new
sequences take a free slot next to the busy ones (`_pick_slot`), so running sequences stay
packed and a step is one pass (plus the rest of a prompt chunk longer than the decodes beside
it); among such slots, the one where the least cached work is overwritten.

The token budget (`engine/budget.py`): by default a step holds twice its decodes (at least
16 tokens) and a prompt whose rest fits in that joins whole, longer prompts in chunks;
`step_tokens` makes it a fixed cap.

Prompt caching (`cache_prompt`, like llama.cpp server's slot reuse and its prompt cache):
a finished or cancelled sequence leaves its KV cells in its slot, and the scheduler
remembers which tokens they hold. A new sequence takes the longest prefix of its prompt that
any slot holds: its own slot's kept cells are trimmed to the prefix (`llama_memory_seq_rm`);
another slot's cells, kept or of a running sequence, are copied (`llama_memory_seq_cp`, a
copy of that slot's whole KV stream, done inside the next `llama_decode` and cheaper than
computing a few tokens, so only for a prefix `min_copy_tokens` longer than the slot's own)
and trimmed. A prompt that shares a long prefix with one still being
prefilled (the `n` choices of one request, a burst with one long system prompt) waits for
that prefill and copies it instead of computing it twice. At least the last prompt token is
always decoded again, so that position yields the logits of the first sampled token. A
sequence that fails leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import llama_cpp

from sluice.engine.admission import Admission
from sluice.engine.budget import AdaptiveBudget, FixedBudget, StepBudget
from sluice.engine.metrics import EngineMetrics, EngineShare
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
BatchObserver = Callable[[list[tuple[int, int]]], None]
"""Called before each decode with the batch's (slot, tokens) in batch order."""
PREFILL_AGING_S = 10.0
"""A prompt prefilling for this long goes ahead of shorter ones of its priority."""


def min_copy_tokens(n_ctx: int) -> int:
    """Prefix tokens another slot must add over a slot's own cache to be worth copying. The
    copy moves that slot's whole KV stream (n_ctx cells), measured at under two tokens'
    worth of compute for 1,024 cells (docs/architecture.md); it grows with the cells, so the
    bar does too, with a margin of two to three."""
    return max(4, n_ctx // 256)


class Scheduler:
    """Owns the model's context on one thread; everything else talks to it via `submit`."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        max_queue: int,
        max_queue_wait_s: float,
        prefill_chunk: int,
        step_tokens: int | None = None,
        cache_prompt: bool = True,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._model = model
        self._prefill_chunk = prefill_chunk
        self._budget: StepBudget = (
            AdaptiveBudget() if step_tokens is None else FixedBudget(step_tokens)
        )
        self._min_copy = min_copy_tokens(model.n_ctx)
        self._cache_prompt = cache_prompt
        # Tokens held in the KV cache of each free slot (decode thread only; a running
        # sequence's own tokens are tracked on the sequence and stored here on release).
        self._cached: list[list[int]] = [[] for _ in range(model.n_seq)]
        self._freed = [0] * model.n_seq  # when each slot was last freed (a release count)
        self._releases = 0
        self._metrics = metrics
        self._share = EngineShare(metrics) if metrics is not None else None
        if self._share is not None:
            self._share.set("kv_cells", model.n_seq * model.n_ctx)
        self._admission = Admission(
            model.n_seq,
            max_queue=max_queue,
            max_wait_s=max_queue_wait_s,
            metrics=metrics,
            share=self._share,
        )
        self._batch: Any = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self._running: list[Sequence] = []  # decode thread only
        self._outbox: list[tuple[Sequence, Item]] = []  # decode thread only, flushed per step
        self.step_observers: list[StepObserver] = []
        self.batch_observers: list[BatchObserver] = []
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
        if self._share is not None and not self._thread.is_alive():
            self._share.clear()  # a closed engine (a reload removed it) counts for nothing

    # -- decode thread ----------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException = EngineClosedError("engine closed")
        try:
            pick = self._pick_slot if self._cache_prompt else None
            while (
                admitted := self._admission.admit(idle=not self._running, pick=pick)
            ) is not None:
                earlier = [s for s in self._running if not s.cancelled]
                for seq, slot in admitted:
                    seq.slot = slot
                    seq.sampler = make_sampler(seq.req)
                    self._start(seq, earlier)
                    self._running.append(seq)
                self._release_cancelled()
                self._resume_waiting()
                if self._running:
                    self._step()
                    self._release_cancelled()  # before the next admission takes a slot
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

    @staticmethod
    def _common(held: list[int], prompt: list[int]) -> int:
        """Leading prompt tokens `held` holds (never the whole prompt)."""
        limit = min(len(held), len(prompt) - 1)
        n = 0
        while n < limit and held[n] == prompt[n]:
            n += 1
        return n

    def _pick_slot(self, seq: Sequence, free: list[int]) -> int:
        """The free slot that keeps the busy slots in the fewest runs of consecutive ids (one
        forward pass each); among those, one whose kept cells are mostly a prefix of the
        prompt (a conversation going on), else one that keeps nothing, else the least
        recently freed. `_start` then copies a cached prefix from wherever it is, so a
        slot's cells are overwritten only when little of them is lost."""
        busy = set(range(len(self._cached))).difference(free)

        def rank(slot: int) -> tuple[int, int, bool, int, int]:
            runs = 1 - (slot - 1 in busy) - (slot + 1 in busy)  # runs it adds
            cached = self._cached[slot]
            n = self._common(cached, seq.prompt)
            useful = n if 2 * n >= len(cached) else 0
            return (runs, -useful, bool(cached), self._freed[slot], slot)

        return min(free, key=rank)

    def _start(self, seq: Sequence, earlier: list[Sequence]) -> None:
        """Give a newly admitted sequence the longest cached prefix of its prompt.

        `earlier`: sequences running before this admission round (their cells are computed).
        """
        slot, prompt = seq.slot, seq.prompt
        own = self._common(self._cached[slot], prompt) if self._cache_prompt else 0
        best, src = own, slot
        if self._cache_prompt:
            for other, held in enumerate(self._cached):
                if other != slot and held and (n := self._common(held, prompt)) > best:
                    best, src = n, other
            for run in earlier:
                if run.slot != slot and (n := self._common(run.held(), prompt)) > best:
                    best, src = n, run.slot
            # A prompt still being prefilled that will hold a longer prefix: wait for it.
            pending, share = None, best
            for run in self._running:
                # Never behind a lower priority's prefill: it may get no room for long.
                lower = run.req.priority < seq.req.priority
                if run is not seq and run.prefilling and run.source is None and not lower:
                    n = self._common(run.prompt, prompt)
                    if n > share:
                        pending, share = run, n
            if pending is not None and share >= max(best, own) + self._min_copy:
                self._forget(slot)
                seq.source, seq.share = pending, share
                return
            if src != slot and best < own + self._min_copy:
                best, src = own, slot
        self._place(seq, src, best)

    def _place(self, seq: Sequence, src: int, n: int) -> None:
        """Start `seq` with its first `n` prompt tokens taken from slot `src`'s cells."""
        slot, memory = seq.slot, self._model.memory
        if n > 0 and src != slot:
            llama_cpp.llama_memory_seq_cp(memory, src, slot, 0, -1)  # whole stream, then trim
        if n > 0 and not llama_cpp.llama_memory_seq_rm(memory, slot, n, -1):
            n = 0  # this memory cannot drop a tail (e.g. recurrent): start over
        if n == 0:
            llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
        self._cached[slot] = []
        seq.cursor = seq.n_past = seq.reused = n
        seq.source, seq.share = None, 0
        if n and self._metrics:
            self._metrics.prompt_tokens_reused.inc(n)

    def _forget(self, slot: int) -> None:
        if self._cached[slot]:
            llama_cpp.llama_memory_seq_rm(self._model.memory, slot, -1, -1)
            self._cached[slot] = []

    def _resume_waiting(self) -> None:
        """Copy a finished shared prefill to the sequences waiting for it."""
        for seq in self._running:
            source = seq.source
            if source is None:
                continue
            if source in self._running and not source.cancelled:
                if source.cursor >= seq.share:
                    self._place(seq, source.slot, seq.share)
            else:  # the source ended or failed: take what is cached now
                seq.source = None
                self._start(seq, [s for s in self._running if s.source is None])

    def _release_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq, outcome="cancelled")

    def _release(self, seq: Sequence, *, outcome: str) -> None:
        """Free the slot and the sampler of a sequence that is done.

        Its KV cells stay for the next request in the slot (prompt caching) unless it failed.
        """
        self._releases += 1
        self._freed[seq.slot] = self._releases
        if self._cache_prompt and outcome != "error" and seq.source is None:
            self._cached[seq.slot] = seq.held()
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
        # Who takes part: every decoding sequence (one token), then prefilling ones
        # (chunks of their prompts) within the step's token budget.
        takes: list[tuple[Sequence, int]] = []
        decoded = 0
        for seq in self._running:
            seq.batch_index = -1
            if not seq.prefilling and seq.source is None:
                takes.append((seq, 1))
                decoded += 1
        # Prompt room goes to the shortest rest of a prompt first within a priority (so a
        # short prompt joins at once instead of queueing behind a long one's chunks), except
        # that a prompt prefilling for PREFILL_AGING_S goes first (shortest first alone lets
        # a stream of short prompts starve a long one). Room a higher priority leaves over
        # goes to the lower ones.
        now = time.monotonic()
        taken, room = 0, min(self._prefill_chunk, self._model.n_batch - decoded)
        for seq in sorted(self._running, key=lambda s: _prefill_order(s, now)):
            if seq.prefilling and seq.source is None:
                rest = len(seq.prompt) - seq.cursor
                split = seq.cursor > seq.reused
                take = min(self._budget.take(decoded, taken, rest, split), room - taken)
                if take > 0:
                    takes.append((seq, take))
                    taken += take
        if not takes:
            return
        # Tokens go in in slot (sequence id) order: llama.cpp decodes each run of
        # consecutive ids as one forward pass, and ids running backwards cost one each.
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
        for watch in self.batch_observers:
            watch([(seq.slot, take) for seq, take in takes])
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._model.ctx, batch)
        elapsed = time.perf_counter() - started
        if rc != 0:
            for seq in in_batch:
                self._release(seq, outcome="error")
                seq.fail(DecodeError(f"llama_decode failed with status {rc}"))
            return
        if self._metrics is not None and self._share is not None:
            self._metrics.observe_step(
                sequences=len(in_batch),
                prompt_tokens=n - decoded,
                decode_tokens=decoded,
                seconds=elapsed,
                kv_cells_used=self._kv_cells_used(),
                share=self._share,
            )
        for observe in self.step_observers:
            observe(len(in_batch), n - decoded, decoded)
        for seq in in_batch:
            if seq.batch_index >= 0:
                self._sample(seq)
        self._flush()

    def _kv_cells_used(self) -> int:
        held = sum(seq.n_past for seq in self._running)
        return held + sum(len(cells) for cells in self._cached)

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


def _prefill_order(seq: Sequence, now: float) -> tuple[int, int, int]:
    """Higher priority first; within one, prompts prefilling for PREFILL_AGING_S in arrival
    order, then the shortest rest first."""
    rest = len(seq.prompt) - seq.cursor
    aged = now - seq.admitted_at >= PREFILL_AGING_S
    return (-seq.req.priority, 0 if aged else rest, seq.order)
