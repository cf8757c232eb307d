"""A generic asyncio micro-batcher: gather single submissions into batches.

Callers `await batcher.submit(item)` one item at a time; the batcher groups items that
arrive close together and hands each group to one `process(items)` call, which returns
one result per item, in order (a `BaseException` in a slot fails only that item's caller).

A batch is dispatched when it reaches ``max_batch_size`` items, when adding the next item
would push its total ``cost`` over ``max_batch_cost``, or ``max_wait_s`` after its first
item arrived, whichever comes first.

Cancellation: a caller that goes away before its batch is dispatched takes its item out of
the pending batch; once dispatched, a batch runs to completion whatever its callers do, and
results for callers that left are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """The batcher is closed (or closing) and accepts no more items."""


@dataclass(slots=True, eq=False)
class _Entry(Generic[T, R]):
    item: T
    cost: int
    future: asyncio.Future[R] = field(repr=False)


def _unit_cost(_item: object) -> int:
    return 1


class MicroBatcher(Generic[T, R]):
    """Group concurrent `submit` calls into batched `process` calls."""

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        max_batch_size: int,
        max_wait_s: float,
        max_batch_cost: int | None = None,
        cost: Callable[[T], int] = _unit_cost,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if max_batch_cost is not None and max_batch_cost < 1:
            raise ValueError("max_batch_cost must be at least 1")
        self._process = process
        self._max_size = max_batch_size
        self._max_wait = max_wait_s
        self._max_cost = max_batch_cost
        self._cost = cost
        self._pending: list[_Entry[T, R]] = []
        self._pending_cost = 0
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Items waiting for their batch to be dispatched."""
        return len(self._pending)

    @property
    def inflight(self) -> int:
        """Batches being processed now."""
        return len(self._inflight)

    async def submit(self, item: T) -> R:
        """Queue `item` and wait for its result (or raise its exception)."""
        if self._closed:
            raise BatcherClosedError("micro-batcher is closed")
        loop = asyncio.get_running_loop()
        item_cost = self._cost(item)
        if (
            self._max_cost is not None
            and self._pending
            and self._pending_cost + item_cost > self._max_cost
        ):
            self._dispatch()
        entry: _Entry[T, R] = _Entry(item, item_cost, loop.create_future())
        self._pending.append(entry)
        self._pending_cost += item_cost
        if len(self._pending) >= self._max_size or (
            self._max_cost is not None and self._pending_cost >= self._max_cost
        ):
            self._dispatch()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait, self._dispatch)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._withdraw(entry)
            raise

    async def flush(self) -> None:
        """Dispatch whatever is pending now and wait for every in-flight batch."""
        if self._pending:
            self._dispatch()
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def close(self, *, flush: bool = True) -> None:
        """Refuse new items; flush pending ones (or fail them with `flush=False`)."""
        self._closed = True
        if not flush:
            self._cancel_timer()
            pending, self._pending, self._pending_cost = self._pending, [], 0
            for entry in pending:
                if not entry.future.done():
                    entry.future.set_exception(BatcherClosedError("micro-batcher closed"))
        await self.flush()

    def _withdraw(self, entry: _Entry[T, R]) -> None:
        try:
            self._pending.remove(entry)
        except ValueError:
            return  # already dispatched: the batch runs on without this caller
        self._pending_cost -= entry.cost
        if not self._pending:
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self) -> None:
        self._cancel_timer()
        batch, self._pending, self._pending_cost = self._pending, [], 0
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            results = await self._process([entry.item for entry in batch])
        except Exception as exc:
            for entry in batch:
                _resolve_error(entry.future, exc)
            return
        except BaseException as exc:  # cancelled while processing: fail callers, re-raise
            for entry in batch:
                _resolve_error(entry.future, exc)
            raise
        if len(results) != len(batch):
            error = RuntimeError(
                f"batch process returned {len(results)} results for {len(batch)} items"
            )
            for entry in batch:
                _resolve_error(entry.future, error)
            return
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)


def _resolve_error(future: asyncio.Future[R], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
