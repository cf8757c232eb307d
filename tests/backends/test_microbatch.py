"""The generic micro-batcher: grouping, limits, per-item errors, cancellation, close."""

from __future__ import annotations

import asyncio

import pytest

from sluice.backends.microbatch import BatcherClosedError, MicroBatcher


class Recorder:
    """A `process` that records each batch and echoes items doubled."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.started = asyncio.Event()
        self.release: asyncio.Event | None = None

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        out: list[int | BaseException] = []
        for item in items:
            out.append(ValueError(f"bad {item}") if item < 0 else item * 2)
        return out


async def test_concurrent_submits_share_one_batch() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    assert results == [0, 2, 4, 6, 8]
    assert rec.batches == [[0, 1, 2, 3, 4]]


async def test_max_batch_size_splits_batches() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=3, max_wait_s=1.0)
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(i) for i in range(6))), timeout=0.5
    )
    assert results == [0, 2, 4, 6, 8, 10]
    assert rec.batches == [[0, 1, 2], [3, 4, 5]]


async def test_max_wait_dispatches_a_partial_batch() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=100, max_wait_s=0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await batcher.submit(7) == 14
    assert 0.015 <= loop.time() - t0 < 0.5
    assert rec.batches == [[7]]


async def test_cost_limit_closes_a_batch_before_it_overflows() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        rec, max_batch_size=100, max_wait_s=0.01, max_batch_cost=10, cost=lambda item: item
    )
    results = await asyncio.gather(*(batcher.submit(i) for i in (4, 4, 4, 6, 20, 1)))
    assert results == [8, 8, 8, 12, 40, 2]
    # 4+4 fits, +4 would be 12 > 10: dispatch; 4+6 reaches 10: dispatch at once;
    # 20 alone is over the limit but still runs (alone); 1 follows in a new batch.
    assert rec.batches == [[4, 4], [4, 6], [20], [1]]


async def test_exception_slot_fails_only_that_item() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=0.01)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-1), batcher.submit(2), return_exceptions=True
    )
    assert results[0] == 2
    assert isinstance(results[1], ValueError)
    assert results[2] == 4


async def test_process_failure_fails_the_whole_batch() -> None:
    async def broken(items: list[int]) -> list[int | BaseException]:
        raise RuntimeError("backend down")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken, max_batch_size=10, max_wait_s=0.0)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_wrong_result_count_is_an_error() -> None:
    async def short(items: list[int]) -> list[int | BaseException]:
        return [1]

    batcher: MicroBatcher[int, int] = MicroBatcher(short, max_batch_size=10, max_wait_s=0.0)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_cancelled_caller_is_dropped_before_dispatch() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=0.05)
    keep = asyncio.create_task(batcher.submit(1))
    gone = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    assert batcher.pending == 2
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.pending == 1
    assert await keep == 2
    assert rec.batches == [[1]]


async def test_only_cancelled_caller_leaves_nothing_to_dispatch() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=0.01)
    gone = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.sleep(0.03)
    assert rec.batches == []
    assert batcher.pending == 0


async def test_dispatched_batch_survives_a_caller_leaving() -> None:
    rec = Recorder()
    rec.release = asyncio.Event()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=2, max_wait_s=1.0)
    gone = asyncio.create_task(batcher.submit(1))
    keep = asyncio.create_task(batcher.submit(2))
    await rec.started.wait()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    rec.release.set()
    assert await keep == 4
    assert rec.batches == [[1, 2]]
    await batcher.flush()
    assert batcher.inflight == 0


async def test_close_flushes_pending_and_refuses_new_items() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=60.0)
    waiting = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    await batcher.close()
    assert await waiting == 6
    with pytest.raises(BatcherClosedError):
        await batcher.submit(4)


async def test_close_without_flush_fails_pending() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=10, max_wait_s=60.0)
    waiting = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    await batcher.close(flush=False)
    with pytest.raises(BatcherClosedError):
        await waiting
    assert rec.batches == []


async def test_close_waits_for_inflight_batches() -> None:
    rec = Recorder(delay=0.02)
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=1, max_wait_s=1.0)
    task = asyncio.create_task(batcher.submit(5))
    await rec.started.wait()
    await batcher.close()
    assert task.done()
    assert task.result() == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0, "max_wait_s": 0.1},
        {"max_batch_size": 1, "max_wait_s": -1.0},
        {"max_batch_size": 1, "max_wait_s": 0.1, "max_batch_cost": 0},
    ],
)
def test_invalid_limits_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        MicroBatcher(Recorder(), **kwargs)  # type: ignore[arg-type]
