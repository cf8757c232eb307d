"""The budget ledgers: the admission rule, holds that lapse, the real cost replacing a hold,
and (on Redis) one ledger shared by several replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from sluice.errors import ServiceUnavailableError
from sluice.pipeline.budgets import (
    NANO,
    BudgetLedger,
    MemoryBudgets,
    RedisBudgets,
    account_name,
    to_nano,
)
from tests.services import require_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_amounts_are_exact_nano_dollars_rounded_up_for_holds() -> None:
    assert to_nano(1.0) == NANO
    assert to_nano(0.1 + 0.2) == 300_000_000
    assert to_nano(1e-12, up=True) == 1
    assert to_nano(1e-12) == 0


def test_accounts_are_per_key_and_budget_period() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    assert account_name("key_a", None) == "key_a:lifetime"
    assert account_name("key_a", start) != account_name("key_a", datetime(2026, 11, 1, tzinfo=UTC))


async def test_memory_rule_holds_then_the_last_request_then_refuses() -> None:
    ledger = MemoryBudgets()
    budget, cost = to_nano(1.0), to_nano(0.4)
    a = await ledger.reserve("k", "r1", cost, budget, 0)
    b = await ledger.reserve("k", "r2", cost, budget, 0)
    assert a is not None
    assert b is not None
    assert await ledger.reserve("k", "r3", cost, budget, 0) is None  # 1.2 > 1 with holds
    ledger.release_nowait(a, cost)
    ledger.release_nowait(b, cost)
    last = await ledger.reserve("k", "r4", cost, budget, 0)  # spent 0.8 < 1, nothing held
    assert last is not None
    ledger.release_nowait(last, cost)
    assert await ledger.reserve("k", "r5", cost, budget, 0) is None  # spent 1.2: done


async def test_memory_release_replaces_the_hold_with_the_real_cost_once() -> None:
    ledger = MemoryBudgets()
    budget = to_nano(1.0)
    hold = await ledger.reserve("k", "r1", to_nano(0.9), budget, 0)
    assert hold is not None
    ledger.release_nowait(hold, to_nano(0.1))
    ledger.release_nowait(hold, to_nano(0.1))  # twice: counted once
    assert await ledger.reserve("k", "r2", to_nano(0.8), budget, 0) is not None


async def test_memory_stored_spend_from_other_replicas_is_never_forgotten() -> None:
    ledger = MemoryBudgets()
    budget = to_nano(1.0)
    hold = await ledger.reserve("k", "r1", to_nano(0.1), budget, 0)
    assert hold is not None
    ledger.release_nowait(hold, to_nano(0.1))
    # The database (all replicas) says 0.95 by now: that, not the ledger's 0.1, counts
    # (with 0.1 spent, both of these would fit).
    stored = to_nano(0.95)
    assert await ledger.reserve("k", "r2", to_nano(0.1), budget, stored) is not None  # the last
    assert await ledger.reserve("k", "r3", to_nano(0.1), budget, stored) is None


async def test_memory_accounts_stay_bounded() -> None:
    clock = Clock()
    ledger = MemoryBudgets(idle_seconds=60, max_accounts=100, clock=clock)
    for i in range(1000):
        hold = await ledger.reserve(f"k{i}", "r", 1, NANO, 0)
        assert hold is not None
        ledger.release_nowait(hold, 1)
        clock.now += 0.001
    assert len(ledger._accounts) <= 100


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(require_redis(), socket_timeout=1)
    yield client
    await client.aclose()


def _redis_ledger(client: aioredis.Redis, prefix: str, **options: float) -> RedisBudgets:
    return RedisBudgets(client, prefix=prefix, **options)  # type: ignore[arg-type]


@pytest.mark.redis
async def test_redis_replicas_share_one_ledger(redis_client: aioredis.Redis) -> None:
    prefix = f"test:budget:{uuid.uuid4().hex}:"
    replicas: list[BudgetLedger] = [_redis_ledger(redis_client, prefix) for _ in range(3)]
    budget, cost = to_nano(1.0), to_nano(0.4)
    holds = await asyncio.gather(
        *(replicas[i % 3].reserve("k", f"r{i}", cost, budget, 0) for i in range(30))
    )
    granted = [hold for hold in holds if hold is not None]
    assert len(granted) == 2  # 0.8 fits, 1.2 does not
    for i, hold in enumerate(granted):
        replicas[i].release_nowait(hold, cost)
    for replica in replicas:
        await replica.close()  # waits for the releases
    last = await replicas[2].reserve("k", "r-last", cost, budget, 0)
    assert last is not None  # spent 0.8 < 1 with nothing held: the last one
    replicas[2].release_nowait(last, cost)
    await replicas[2].close()
    assert await replicas[0].reserve("k", "r-after", cost, budget, 0) is None
    assert int(await redis_client.hget(prefix + "k", "s")) == 3 * cost


@pytest.mark.redis
async def test_redis_a_lost_release_lapses_with_the_lease(redis_client: aioredis.Redis) -> None:
    prefix = f"test:budget:{uuid.uuid4().hex}:"
    ledger = _redis_ledger(redis_client, prefix, lease_seconds=0.2)
    budget = to_nano(1.0)
    assert await ledger.reserve("k", "lost", to_nano(0.9), budget, 0) is not None
    assert await ledger.reserve("k", "r2", to_nano(0.5), budget, 0) is None
    await asyncio.sleep(0.3)
    assert await ledger.reserve("k", "r3", to_nano(0.5), budget, 0) is not None


async def test_redis_down_follows_the_failure_mode() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    failures: list[Exception] = []
    open_ledger = RedisBudgets(dead, on_failure=failures.append)
    # Open: this process's own ledger holds instead (the budget still binds here).
    hold = await open_ledger.reserve("k", "r", to_nano(0.6), NANO, 0)
    assert hold is not None
    assert hold.local
    assert await open_ledger.reserve("k", "r2", to_nano(0.6), NANO, 0) is None
    open_ledger.release_nowait(hold, to_nano(0.1))
    assert await open_ledger.reserve("k", "r3", to_nano(0.6), NANO, 0) is not None
    closed = RedisBudgets(dead, failure_mode="closed", on_failure=failures.append)
    with pytest.raises(ServiceUnavailableError):
        await closed.reserve("k", "r", NANO, NANO, 0)
    assert len(failures) == 4
    await dead.aclose()
