"""The admission-header rule, once for all its implementations.

A request is checked against several scopes; its ``x-ratelimit-*`` numbers (limit,
remaining, reset, for requests and for tokens) come from one scope each, chosen by one
rule: the least remaining, then the smallest limit, then the first of equals, among the
scopes that have that limit. `window.build_admission` is its Python definition (the memory
limiter's), the Lua script (`lua.py`) has its own copy. Every scenario here runs against
the rule itself, the memory limiter and the Redis limiter (skipped without Redis).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sluice.pipeline.limits import (
    Admission,
    LimitScope,
    LimitSpec,
    MemoryLimiter,
    Reason,
    RedisLimiter,
)
from sluice.pipeline.limits.window import WINDOW_BUCKETS, Usage, build_admission
from tests.pipeline.test_limits_redis import _wire, redis_now, seed

Numbers = tuple[int, int, int | None]
"""Expected header numbers of one kind: limit, remaining, and the age (seconds before the
current one) of the bucket whose leaving is the reset; None: nothing counted, reset 0."""


@dataclass(frozen=True)
class Scenario:
    """Scopes with usage already counted (per scope: bucket age -> (requests, tokens)),
    then a request of ``tokens`` over them, and the answer's expected header numbers."""

    name: str
    scopes: tuple[tuple[str, LimitSpec, dict[int, tuple[int, int]]], ...]
    tokens: int
    allowed: bool
    reason: Reason | None
    requests: Numbers | None
    tokens_numbers: Numbers | None


SCENARIOS = [
    Scenario(
        "one scope",
        (("a", LimitSpec(rpm=10, tpm=1000), {30: (3, 200)}),),
        tokens=100, allowed=True, reason=None,
        requests=(10, 6, 30), tokens_numbers=(1000, 700, 30),
    ),
    Scenario(
        "the least remaining, chosen per kind",
        (("a", LimitSpec(rpm=10, tpm=1000), {20: (2, 100)}),
         ("b", LimitSpec(rpm=5, tpm=5000), {40: (1, 3000)})),
        tokens=100, allowed=True, reason=None,
        requests=(5, 3, 40), tokens_numbers=(1000, 800, 20),
    ),
    Scenario(
        "equal remaining: the smaller limit",
        (("a", LimitSpec(rpm=10), {10: (4, 0)}), ("b", LimitSpec(rpm=8), {50: (2, 0)})),
        tokens=0, allowed=True, reason=None,
        requests=(8, 5, 50), tokens_numbers=None,
    ),
    Scenario(
        "equal remaining and limit: the first scope",
        (("a", LimitSpec(rpm=6), {10: (1, 0)}), ("b", LimitSpec(rpm=6), {45: (1, 0)})),
        tokens=0, allowed=True, reason=None,
        requests=(6, 4, 10), tokens_numbers=None,
    ),
    Scenario(
        "equal remaining and limit, the other order: the first scope",
        (("b", LimitSpec(rpm=6), {45: (1, 0)}), ("a", LimitSpec(rpm=6), {10: (1, 0)})),
        tokens=0, allowed=True, reason=None,
        requests=(6, 4, 45), tokens_numbers=None,
    ),
    Scenario(
        "a scope without the limit is passed over; a fresh window resets with this second",
        (("a", LimitSpec(tpm=500), {5: (0, 100)}), ("b", LimitSpec(rpm=3), {})),
        tokens=50, allowed=True, reason=None,
        requests=(3, 2, 0), tokens_numbers=(500, 350, 5),
    ),
    Scenario(
        "refused: the usage before the request, remaining at least 0",
        (("a", LimitSpec(rpm=2), {15: (2, 0)}), ("b", LimitSpec(tpm=100), {25: (0, 150)})),
        tokens=10, allowed=False, reason="rpm",
        requests=(2, 0, 15), tokens_numbers=(100, 0, 25),
    ),
    Scenario(
        "refused with nothing counted: reset 0",
        (("a", LimitSpec(tpm=50), {}),),
        tokens=80, allowed=False, reason="tpm",
        requests=None, tokens_numbers=(50, 50, None),
    ),
    Scenario(
        "no scope limits requests or tokens",
        (("a", LimitSpec(max_parallel=3), {}),),
        tokens=10, allowed=True, reason=None,
        requests=None, tokens_numbers=None,
    ),
]  # fmt: skip

Admit = Callable[[Scenario], Awaitable[tuple[Admission, tuple[float, float]]]]
"""An implementation: the scenario's answer, and when it was decided (between the two
times, in one second)."""

NOW = 5000.25


def _scopes(scenario: Scenario) -> list[LimitScope]:
    return [LimitScope(name, spec) for name, spec, _ in scenario.scopes]


async def _by_the_rule(scenario: Scenario) -> tuple[Admission, tuple[float, float]]:
    """The rule itself: the scopes' usage (with the request's, when admitted) handed to
    build_admission."""
    second = int(NOW)
    requests: list[Usage] = []
    tokens: list[Usage] = []
    for _, spec, buckets in scenario.scopes:
        for limit, which, add, out in (
            (spec.rpm, 0, 1, requests),
            (spec.tpm, 1, scenario.tokens, tokens),
        ):
            if limit is None:
                continue
            counted = {second - age: used[which] for age, used in buckets.items() if used[which]}
            if scenario.allowed:
                counted[second] = counted.get(second, 0) + add
            out.append((limit, sum(counted.values()), min(counted, default=None)))
    admission = build_admission(scenario.allowed, scenario.reason, 1.0, requests, tokens, NOW, None)
    return admission, (NOW, NOW)


async def _in_memory(scenario: Scenario) -> tuple[Admission, tuple[float, float]]:
    """The memory limiter, its usage counted by earlier requests at the buckets' times."""
    clock = [NOW - 60]
    limiter = MemoryLimiter(clock=lambda: clock[0])
    seeds = [
        (age, name, used) for name, _, buckets in scenario.scopes for age, used in buckets.items()
    ]
    seeds.sort(reverse=True)  # the oldest first
    for age, name, (requests, tokens) in seeds:
        clock[0] = int(NOW) - age + 0.5
        for _ in range(requests):
            limiter.acquire_now([LimitScope(name, LimitSpec(rpm=10**9))], 0, "seed", 1.0)
        if tokens:
            limiter.acquire_now([LimitScope(name, LimitSpec(tpm=10**9))], tokens, "seed", 1.0)
    clock[0] = NOW
    return limiter.acquire_now(_scopes(scenario), scenario.tokens, "r", 30.0), (NOW, NOW)


def _on_redis(redis: aioredis.Redis, prefix: str) -> Admit:
    """The Redis limiter (the Lua script), its usage written into its window hashes."""

    async def admit(scenario: Scenario) -> tuple[Admission, tuple[float, float]]:
        for _ in range(3):  # again, should the decision fall in a later second than the seeds
            await _forget(redis, prefix)
            before = await redis_now(redis)
            second = int(before)
            for name, _, buckets in scenario.scopes:
                for suffix, which in ((":r", 0), (":t", 1)):
                    counted = {second - age: used[which] for age, used in buckets.items()}
                    counted = {s: amount for s, amount in counted.items() if amount}
                    if counted:
                        await seed(redis, prefix + name + suffix, counted)
            client = _wire()
            try:
                limiter = RedisLimiter(client, prefix=prefix, failure_mode="closed")
                admission = await limiter.acquire(
                    _scopes(scenario), scenario.tokens, uuid.uuid4().hex, 30.0
                )
                await limiter.close()
            finally:
                await client.close()
            seconds, micros = await redis.time()
            after = seconds + micros / 1e6
            if int(after) == second:
                return admission, (before, after)
        pytest.fail("Redis's clock crossed a second during every try")

    return admit


async def _forget(redis: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture(params=["rule", "memory", pytest.param("redis", marks=pytest.mark.redis)])
def admit(request: pytest.FixtureRequest) -> Admit:
    if request.param == "rule":
        return _by_the_rule
    if request.param == "memory":
        return _in_memory
    redis: aioredis.Redis = request.getfixturevalue("redis")
    prefix: str = request.getfixturevalue("prefix")
    return _on_redis(redis, prefix)


def _expected_reset(age: int | None, now: float) -> float:
    return 0.0 if age is None else int(now) - age + WINDOW_BUCKETS - now


def _between(value: float | None, low: float, high: float) -> bool:
    """``low <= value <= high``, give or take Redis's whole milliseconds (its clock read is
    floored to the millisecond, so its resets can be up to 1 ms longer)."""
    return value is not None and low - 1e-6 <= value <= high + 0.001 + 1e-6


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_the_header_numbers_follow_the_one_rule(admit: Admit, scenario: Scenario) -> None:
    admission, (earliest, latest) = await admit(scenario)
    assert (admission.allowed, admission.reason) == (scenario.allowed, scenario.reason)
    got = {
        "requests": (
            admission.limit_requests, admission.remaining_requests, admission.reset_requests
        ),
        "tokens": (admission.limit_tokens, admission.remaining_tokens, admission.reset_tokens),
    }  # fmt: skip
    for kind, numbers in (("requests", scenario.requests), ("tokens", scenario.tokens_numbers)):
        if numbers is None:
            assert got[kind] == (None, None, None), kind
            continue
        limit, remaining, age = numbers
        assert got[kind][:2] == (limit, remaining), kind
        # Redis decides on its own clock, between the two readings of it.
        reset = got[kind][2]
        low, high = _expected_reset(age, latest), _expected_reset(age, earliest)
        assert _between(reset, low, high), (kind, reset, low, high)
