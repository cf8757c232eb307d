"""Budgets reserved at admission: spend can exceed a key's budget by at most one request.

Usage records reach the database (and a key's ``spend_usd``) in batches, after the
request; checking only the stored spend let every request that arrived within that lag
through (a 1 USD budget served about 50 USD). So admission *reserves* each request's
worst-case cost (its prompt estimate and completion ceiling at the model's prices) in a
ledger, and the end of the request replaces the reservation with the real cost.

One ledger account per key and budget period holds the spend the ledger has seen and the
reservations in flight. A request is admitted when

    spent + reserved + worst_case <= budget,  or
    nothing is reserved and spent < budget   (the key's last request: overshoot <= one cost)

``spent`` is the larger of the ledger's own count and the key's stored spend (the auth
cache's copy of the database row), so spend written by other replicas (memory ledgers)
or before the account existed is never forgotten.

Amounts are integer nano-dollars (exact sums on Redis, where floats would drift).
In-process holds are released by the end of their request, always (it runs in a
``finally``). On Redis a release can be lost (a lost reply, a crashed replica), so holds
there are leases that lapse after ``lease_seconds``: longer than any request may run (the
longest upstream timeout plus the client write deadline; see `sluice.services`), so a
lost release keeps the budget stricter until then, and a lease never lapses under a
request still running.

`MemoryBudgets` serves one process; `RedisBudgets` shares the accounts among replicas (one
script call per admission of a budgeted key, on Redis's clock). Keys without a budget never
reach a ledger.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from redis.exceptions import RedisError

from sluice.errors import ServiceUnavailableError

NANO = 1_000_000_000
"""Nano-dollars per dollar: the ledgers' unit."""

FailureMode = Literal["open", "closed"]


def to_nano(usd: float, *, up: bool = False) -> int:
    """``usd`` in integer nano-dollars (rounded up for reservations)."""
    value = usd * NANO
    return math.ceil(value) if up else round(value)


@dataclass(slots=True)
class BudgetHold:
    """A reservation: which account, for which request, how much (nano-dollars)."""

    account: str
    request_id: str
    amount: int
    released: bool = False
    local: bool = False
    """Held by the process's own ledger (`RedisBudgets` while Redis is failing)."""


class BudgetLedger(Protocol):
    async def reserve(
        self, account: str, request_id: str, amount: int, budget: int, stored_spend: int
    ) -> BudgetHold | None:
        """Reserve ``amount`` for ``request_id``: the hold, or None when the budget refuses.
        ``request_id`` must be unique (server-made)."""
        ...

    def release_nowait(self, hold: BudgetHold, actual: int) -> None:
        """Replace the hold with the real cost ``actual``; once per hold (more is harmless),
        never waits or raises."""
        ...

    async def close(self) -> None: ...


def account_name(key_id: str, period_started_at: Any) -> str:
    """A ledger account: the key and its budget period (a new period, a new account)."""
    period = "lifetime" if period_started_at is None else period_started_at.isoformat()
    return f"{key_id}:{period}"


@dataclass(slots=True)
class _Account:
    spent: int
    holds: dict[str, int] = field(default_factory=dict)  # request id -> amount
    reserved: int = 0
    touched: float = 0.0


class MemoryBudgets:
    """The ledger of one process. Accounts idle (nothing held) for ``idle_seconds`` are
    forgotten and start again from the stored spend, which by then includes everything
    this process spent."""

    def __init__(
        self,
        *,
        idle_seconds: float = 600.0,
        max_accounts: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle = idle_seconds
        self._max_accounts = max_accounts
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._next_sweep = clock() + idle_seconds

    async def reserve(
        self, account: str, request_id: str, amount: int, budget: int, stored_spend: int
    ) -> BudgetHold | None:
        return self.reserve_now(account, request_id, amount, budget, stored_spend)

    def reserve_now(
        self, account: str, request_id: str, amount: int, budget: int, stored_spend: int
    ) -> BudgetHold | None:
        now = self._clock()
        if now >= self._next_sweep or len(self._accounts) >= self._max_accounts:
            self._sweep(now)
        state = self._accounts.get(account)
        if state is None:
            state = self._accounts[account] = _Account(spent=stored_spend)
        state.touched = now
        if stored_spend > state.spent:
            state.spent = stored_spend
        if not _fits(state.spent, state.reserved, amount, budget):
            return None
        state.holds[request_id] = amount
        state.reserved += amount
        return BudgetHold(account, request_id, amount)

    def release_nowait(self, hold: BudgetHold, actual: int) -> None:
        if hold.released:
            return
        hold.released = True
        state = self._accounts.get(hold.account)
        if state is None:
            return  # forgotten while idle: the stored spend will count it
        held = state.holds.pop(hold.request_id, None)
        if held is not None:
            state.reserved -= held
        state.spent += max(actual, 0)

    async def close(self) -> None:
        self._accounts.clear()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._idle
        idle = [
            name
            for name, state in self._accounts.items()
            if not state.holds and now - state.touched >= self._idle
        ]
        for name in idle:
            del self._accounts[name]
        if len(self._accounts) >= self._max_accounts:
            # Still full: the least recently used that hold nothing (an account with holds
            # is kept, whatever the cap: forgetting it would forget what is in flight).
            quiet = [name for name, state in self._accounts.items() if not state.holds]
            quiet.sort(key=lambda name: self._accounts[name].touched)
            for name in quiet[: len(self._accounts) - self._max_accounts // 2]:
                del self._accounts[name]


def _fits(spent: int, reserved: int, amount: int, budget: int) -> bool:
    return spent + reserved + amount <= budget or (reserved <= 0 and spent < budget)


# KEYS: the account hash (s: spent, r: reserved), its holds' expiries (zset id -> ms), its
#       holds' amounts (hash id -> nano-dollars)
# reserve ARGV: request id, amount, budget, stored spend, lease ms, keys' ttl s
# Returns 1 (held) or 0 (refused). Every amount is an integer (nano-dollars).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, amount, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local stored, lease, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(lapsed) do
  local held = redis.call('HGET', KEYS[3], id)
  if held then redis.call('HINCRBY', KEYS[1], 'r', -tonumber(held)) end
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
end
local spent = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if stored > spent then
  spent = stored
  redis.call('HSET', KEYS[1], 's', spent)
end
local reserved = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local ok = spent + reserved + amount <= budget or (reserved <= 0 and spent < budget)
if ok then
  redis.call('HINCRBY', KEYS[1], 'r', amount)
  redis.call('ZADD', KEYS[2], now + lease, rid)
  redis.call('HSET', KEYS[3], rid, amount)
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], keep) end
return ok and 1 or 0
"""

# release ARGV: request id, actual cost, keys' ttl s. A hold that lapsed meanwhile is not
# subtracted twice; the real cost is counted either way (and the account kept alive).
_RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local held = redis.call('HGET', KEYS[3], ARGV[1])
  if held then redis.call('HINCRBY', KEYS[1], 'r', -tonumber(held)) end
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 's', tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisBudgets:
    """The ledger shared by every replica on one Redis. When Redis fails, ``failure_mode``
    applies as for the rate limiter: ``open`` falls back to this process's own ledger
    (`MemoryBudgets`: exact for this replica, other replicas' spend seen as it reaches the
    database) and ``closed`` answers 503. A failed release is only reported: the hold
    lapses, and the stored spend catches up with the real cost."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "sluice:budget:",
        lease_seconds: float = 900.0,
        idle_seconds: float = 3600.0,
        failure_mode: FailureMode = "open",
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._lease_ms = max(round(lease_seconds * 1000), 1)
        # An account's keys outlive its idle time and its longest hold.
        self._keep = max(round(idle_seconds), round(lease_seconds) + 60, 1)
        self._failure_mode = failure_mode
        self._on_failure = on_failure
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._fallback = MemoryBudgets()

    def _keys(self, account: str) -> list[str]:
        base = self._prefix + account
        return [base, base + ":holds", base + ":amounts"]

    async def reserve(
        self, account: str, request_id: str, amount: int, budget: int, stored_spend: int
    ) -> BudgetHold | None:
        try:
            held = await self._reserve(
                keys=self._keys(account),
                args=[request_id, amount, budget, stored_spend, self._lease_ms, self._keep],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._report(exc)
            if self._failure_mode == "closed":
                raise ServiceUnavailableError(
                    "budget ledger unavailable", headers={"Retry-After": "1"}
                ) from exc
            local = self._fallback.reserve_now(account, request_id, amount, budget, stored_spend)
            if local is not None:
                local.local = True
            return local
        return BudgetHold(account, request_id, amount) if held == 1 else None

    def release_nowait(self, hold: BudgetHold, actual: int) -> None:
        if hold.local:
            self._fallback.release_nowait(hold, actual)
            return
        if hold.released:
            return
        hold.released = True
        task = asyncio.ensure_future(self._send_release(hold, actual))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_release(self, hold: BudgetHold, actual: int) -> None:
        try:
            await self._release(
                keys=self._keys(hold.account),
                args=[hold.request_id, max(actual, 0), self._keep],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._report(exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _report(self, exc: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure(exc)
