"""The waiting queue and the pool of free sequence slots, shared by both sides of the engine.

The event loop submits and cancels; the decode thread takes admissions and returns slots.
One condition variable guards everything here and is held only for list operations, never
across a decode, so the event loop never waits on the model.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

from sluice.engine.metrics import EngineMetrics, EngineShare
from sluice.engine.sequence import Sequence
from sluice.engine.types import EngineClosedError, QueueFullError, QueueTimeoutError


class Admission:
    """Priority-then-FCFS waiting queue with a size bound and a wait bound."""

    def __init__(
        self,
        slots: int,
        *,
        max_queue: int,
        max_wait_s: float,
        metrics: EngineMetrics | None = None,
        share: EngineShare | None = None,
    ) -> None:
        """``share``: this engine's part of ``metrics``' gauges (the scheduler's)."""
        self.slots = slots
        self._max_queue = max_queue
        self._max_wait = max_wait_s
        self._metrics = metrics
        self._share = share
        self._cond = threading.Condition()
        self._waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self._free = list(range(slots))
        self._stopping = False
        self._order = 0

    # -- event-loop side ------------------------------------------------------------------

    def submit(self, seq_factory: Callable[[int], Sequence]) -> Sequence:
        """Queue a new sequence; raise `QueueFullError` at once when the queue is full."""
        with self._cond:
            if self._stopping:
                raise EngineClosedError("engine is shutting down")
            waiting = self._live_waiting()
            # A free slot with nobody ahead is never refused, even with max_queue=0.
            if (waiting or not self._free) and waiting >= self._max_queue:
                if self._metrics:
                    self._metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(f"engine queue is full ({self._max_queue} waiting)")
            self._order += 1
            seq = seq_factory(self._order)
            bisect.insort(self._waiting, seq, key=lambda s: s.sort_key)
            self._gauges()
            self._cond.notify()
            return seq

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._gauges()
                if self._metrics:
                    self._metrics.requests.labels("cancelled").inc()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._cond:
            return self.slots - len(self._free), self._live_waiting()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- decode-thread side -----------------------------------------------------------------

    def admit(
        self, *, idle: bool, pick: Callable[[Sequence, list[int]], int] | None = None
    ) -> list[tuple[Sequence, int]] | None:
        """Sequences to start now, each with its slot; None once stopping.

        While `idle` (nothing running) and nothing waits, block until work arrives. Drops
        cancelled sequences and fails those that waited past the limit. `pick(seq, free)`
        chooses which of the free slots a sequence gets (default: the lowest: llama.cpp
        decodes each run of consecutive sequence ids in a batch as a forward pass of its own,
        so running sequences packed at the low ids make one pass a step).
        """
        with self._cond:
            while idle and not self._stopping and not self._waiting:
                self._cond.wait()
            if self._stopping:
                return None
            now = time.monotonic()
            admitted: list[tuple[Sequence, int]] = []
            keep: list[Sequence] = []
            for seq in self._waiting:
                if seq.cancelled:
                    continue
                if self._free:
                    slot = pick(seq, self._free) if pick else min(self._free)
                    self._free.remove(slot)
                    admitted.append((seq, slot))
                    seq.admitted_at = now
                    if self._metrics:
                        self._metrics.queue_time.observe(now - seq.submitted)
                elif now - seq.submitted > self._max_wait:
                    if self._metrics:
                        self._metrics.rejected.labels("queue_timeout").inc()
                    seq.fail(QueueTimeoutError("timed out waiting for a free slot"))
                else:
                    keep.append(seq)
            self._waiting = keep
            self._gauges()
            return admitted

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._gauges()

    def drain(self) -> list[Sequence]:
        """Stop for good and hand back every sequence still waiting."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            self._gauges()
            return [s for s in waiting if not s.cancelled]

    def _live_waiting(self) -> int:
        return sum(1 for s in self._waiting if not s.cancelled)

    def _gauges(self) -> None:
        if self._share is not None:
            self._share.set("queue_depth", len(self._waiting))
            self._share.set("running_sequences", self.slots - len(self._free))
