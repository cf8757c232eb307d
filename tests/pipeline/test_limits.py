"""MemoryLimiter: exact per-second windows, token reconciliation, parallel leases."""

from __future__ import annotations

import asyncio

import pytest

from sluice.pipeline.limits import Admission, LimitScope, LimitSpec, MemoryLimiter, Ticket


class FakeClock:
    def __init__(self, now: float = 1000.25) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock)


_ids = iter(range(1_000_000))


async def take(
    limiter: MemoryLimiter, *scopes: LimitScope, tokens: int = 0, lease: float = 30.0
) -> Admission:
    return await limiter.acquire(scopes, tokens, f"req-{next(_ids)}", lease)


def ticket_of(admission: Admission) -> Ticket:
    assert admission.allowed
    assert admission.ticket is not None
    return admission.ticket


async def test_rpm_is_exact(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=5))
    for i in range(5):
        admission = await take(limiter, key)
        assert admission.allowed
        assert admission.limit_requests == 5
        assert admission.remaining_requests == 4 - i
    refused = await take(limiter, key)
    assert not refused.allowed
    assert refused.reason == "rpm"
    assert refused.ticket is None
    assert refused.remaining_requests == 0
    # Every request sits in bucket 1000, which leaves the window at 1061.
    assert refused.retry_after == pytest.approx(1061 - 1000.25)
    assert refused.reset_requests == pytest.approx(1061 - 1000.25)


async def test_window_rolls_bucket_by_bucket(limiter: MemoryLimiter, clock: FakeClock) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=5))
    clock.now = 1000.0
    for _ in range(3):
        assert (await take(limiter, key)).allowed
    clock.now = 1010.5
    for _ in range(2):
        assert (await take(limiter, key)).allowed

    clock.now = 1020.0
    refused = await take(limiter, key)
    assert refused.retry_after == pytest.approx(41.0)  # bucket 1000 leaves at 1061

    # No 60-second span may hold more than the limit: bucket 1000 still counts at 1060.999.
    clock.now = 1060.999
    assert not (await take(limiter, key)).allowed

    clock.now = 1061.0
    for _ in range(3):
        assert (await take(limiter, key)).allowed
    refused = await take(limiter, key)
    assert refused.reason == "rpm"
    assert refused.retry_after == pytest.approx(1071.0 - 1061.0)  # bucket 1010 leaves
    assert refused.reset_requests == pytest.approx(10.0)


async def test_retry_after_frees_enough_buckets(limiter: MemoryLimiter, clock: FakeClock) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=4))
    for at in (1000.0, 1001.0, 1002.0, 1003.0):
        clock.now = at
        assert (await take(limiter, key)).allowed
    clock.now = 1030.0
    # The limit shrank (config reload): 4 counted, limit 2, so 3 must leave: buckets 1000-1002.
    refused = await take(limiter, LimitScope("key:a", LimitSpec(rpm=2)))
    assert refused.retry_after == pytest.approx(1002 + 61 - 1030.0)


async def test_tpm_reserve_refund_and_charge(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000))
    first = await take(limiter, key, tokens=600)
    assert first.allowed
    assert (first.limit_tokens, first.remaining_tokens) == (1000, 400)

    refused = await take(limiter, key, tokens=600)
    assert not refused.allowed
    assert refused.reason == "tpm"
    assert 0 < refused.retry_after <= 61

    await limiter.settle(ticket_of(first), 100)  # refund 500
    second = await take(limiter, key, tokens=600)
    assert second.allowed
    assert second.remaining_tokens == 300

    await limiter.settle(ticket_of(second), 1500)  # charge 900 past the reservation
    blocked = await take(limiter, key, tokens=1)
    assert not blocked.allowed
    assert blocked.reason == "tpm"
    assert blocked.remaining_tokens == 0


async def test_tokens_over_the_limit_can_never_pass(limiter: MemoryLimiter) -> None:
    refused = await take(limiter, LimitScope("key:a", LimitSpec(tpm=100)), tokens=101)
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "tpm", 60.0)


async def test_parallel_slots_taken_and_released(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(max_parallel=2))
    a = await take(limiter, key)
    b = await take(limiter, key)
    refused = await take(limiter, key)
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "parallel", 1.0)
    assert a.limit_requests is None
    assert a.limit_tokens is None

    await limiter.settle(ticket_of(a), 0)
    c = await take(limiter, key)
    assert c.allowed
    await limiter.settle(ticket_of(b), 0)
    await limiter.settle(ticket_of(c), 0)
    assert (await take(limiter, key)).allowed


async def test_leases_expire(limiter: MemoryLimiter, clock: FakeClock) -> None:
    key = LimitScope("key:a", LimitSpec(max_parallel=1))
    assert (await take(limiter, key, lease=5.0)).allowed
    clock.now += 4.9
    assert not (await take(limiter, key)).allowed
    clock.now += 0.1
    assert (await take(limiter, key)).allowed


async def test_all_or_nothing_over_scopes(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=10, tpm=1000, max_parallel=5))
    model = LimitScope("key:a:model:m", LimitSpec(rpm=1))
    assert (await take(limiter, key, model, tokens=100)).allowed
    refused = await take(limiter, key, model, tokens=100)
    assert (refused.allowed, refused.reason) == (False, "rpm")
    # The key scope counted only the first request: 1 request, 100 tokens, 1 slot.
    alone = await take(limiter, key, tokens=100)
    assert alone.remaining_requests == 8
    assert alone.remaining_tokens == 800
    for _ in range(3):
        assert (await take(limiter, key)).allowed
    assert not (await take(limiter, key)).allowed  # 5 slots: 1 + 1 + 3


async def test_reason_is_from_first_refusing_scope(limiter: MemoryLimiter) -> None:
    tight_tokens = LimitScope("a", LimitSpec(tpm=10))
    tight_requests = LimitScope("b", LimitSpec(rpm=1))
    assert (await take(limiter, tight_requests)).allowed
    refused = await take(limiter, tight_tokens, tight_requests, tokens=50)
    assert refused.reason == "tpm"
    # The larger wait of the two: rpm's bucket 1000 leaves at 1061 (tpm alone says 60).
    assert refused.retry_after == pytest.approx(1061 - 1000.25)
    refused = await take(limiter, tight_requests, tight_tokens, tokens=5)
    assert refused.reason == "rpm"


async def test_settle_nowait_takes_effect_at_once(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000, max_parallel=1))
    first = await take(limiter, key, tokens=600)
    limiter.settle_nowait(ticket_of(first), 100)  # refund 500 and free the slot, no await
    second = await take(limiter, key, tokens=600)
    assert (second.allowed, second.remaining_tokens) == (True, 300)
    limiter.settle_nowait(ticket_of(first), 100)  # idempotent: second's slot stays taken
    assert (await take(limiter, key)).reason == "parallel"


async def test_settle_is_idempotent(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000, max_parallel=1))
    first = ticket_of(await take(limiter, key, tokens=600))
    await limiter.settle(first, 100)
    second = ticket_of(await take(limiter, key, tokens=100))
    await limiter.settle(first, 100)  # neither refunds again nor frees second's slot
    assert not (await take(limiter, key)).allowed
    await limiter.settle(second, 100)
    after = await take(limiter, key, tokens=0)
    assert after.remaining_tokens == 800


async def test_settle_after_the_window_changes_nothing(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000))
    old = ticket_of(await take(limiter, key, tokens=500))
    clock.now += 61
    await limiter.settle(old, 5000)
    assert (await take(limiter, key, tokens=1000)).allowed


async def test_the_second_follows_the_clock_both_ways(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    # The limiter keeps the current second between calls: it must follow every new second,
    # and a clock set back (an injected one) too.
    key = LimitScope("key:a", LimitSpec(rpm=3))
    clock.now = 1000.9
    assert (await take(limiter, key)).reset_requests == pytest.approx(61 - 0.9)
    clock.now = 1001.0
    assert (await take(limiter, key)).reset_requests == pytest.approx(60.0)  # oldest: 1000
    clock.now = 1061.0  # bucket 1000 has left; 1001 leaves at 1062
    admission = await take(limiter, key)
    assert admission.remaining_requests == 1
    assert admission.reset_requests == pytest.approx(1.0)
    clock.now = 1030.5  # back: bucket 1030 opens before 1061's, nothing is lost
    assert (await take(limiter, key)).remaining_requests == 0
    assert not (await take(limiter, key)).allowed


async def test_unlimited_scopes_and_no_scopes(limiter: MemoryLimiter) -> None:
    admission = await take(limiter, LimitScope("key:a", LimitSpec()), tokens=10**9)
    assert admission.allowed
    assert admission.limit_requests is None
    assert admission.remaining_tokens is None
    await limiter.settle(ticket_of(admission), 5)
    assert (await take(limiter)).allowed


async def test_idle_scopes_are_forgotten(clock: FakeClock) -> None:
    limiter = MemoryLimiter(clock=clock, sweep_interval=10.0)
    for i in range(50):
        await take(limiter, LimitScope(f"key:{i}", LimitSpec(rpm=5)))
    busy = LimitScope("busy", LimitSpec(max_parallel=1))
    assert (await take(limiter, busy, lease=1000.0)).allowed
    clock.now += 62
    await take(limiter, LimitScope("key:new", LimitSpec(rpm=5)))
    assert set(limiter._scopes) == {"busy", "key:new"}
    await limiter.close()


async def test_concurrent_acquires_admit_exactly_the_limit(limiter: MemoryLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=50))
    results = await asyncio.gather(*(take(limiter, key) for _ in range(200)))
    assert sum(r.allowed for r in results) == 50
