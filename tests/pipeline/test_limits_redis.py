"""RedisLimiter against a real Redis on 127.0.0.1:6379 (skipped when there is none)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from sluice.errors import ServiceUnavailableError
from sluice.pipeline.limits import (
    Admission,
    LimitScope,
    LimitSpec,
    RedisLimiter,
    Ticket,
)
from sluice.pipeline.limits.wire import PipelinedRedis, Sink

pytestmark = pytest.mark.redis

HOST, PORT = "127.0.0.1", 6379


def _wire(port: int = PORT, timeout: float = 1.0) -> PipelinedRedis:
    """The limiter's client, as the gateway builds it."""
    return PipelinedRedis(f"redis://{HOST}:{port}/0", timeout=timeout)


def _client(host: str = HOST, port: int = PORT, timeout: float = 1.0) -> aioredis.Redis:
    """A redis-py client, to look at what the limiter wrote: a *blocking* pool (the default
    pool raises MaxConnectionsError past 100 concurrent commands), short timeouts and no
    retries."""
    pool = aioredis.BlockingConnectionPool(
        host=host,
        port=port,
        max_connections=50,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = _client()
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.skip(f"Redis not reachable at {HOST}:{PORT}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    value = f"sluice:test:rl:{uuid.uuid4().hex}:"
    yield value
    keys = [key async for key in redis.scan_iter(match=value + "*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def limiter(redis: aioredis.Redis, prefix: str) -> AsyncIterator[RedisLimiter]:
    client = _wire()
    yield RedisLimiter(client, prefix=prefix, failure_mode="closed")
    await client.close()


async def take(
    limiter: RedisLimiter, *scopes: LimitScope, tokens: int = 0, lease: float = 30.0
) -> Admission:
    return await limiter.acquire(scopes, tokens, uuid.uuid4().hex, lease)


def ticket_of(admission: Admission) -> Ticket:
    assert admission.allowed
    assert admission.ticket is not None
    return admission.ticket


async def redis_now(redis: aioredis.Redis) -> float:
    """Redis's clock, away from the edge of a second so a test cannot straddle one."""
    seconds, micros = await redis.time()
    if micros > 700_000:
        await asyncio.sleep(1.05 - micros / 1e6)
        seconds, micros = await redis.time()
    return seconds + micros / 1e6


async def seed(redis: aioredis.Redis, key: str, buckets: dict[int, int]) -> None:
    """Write a window hash as the script keeps it: buckets, their sum and the oldest one."""
    fields: dict[FieldT, EncodableT] = {"s": sum(buckets.values()), "o": min(buckets)}
    fields.update((second, amount) for second, amount in buckets.items())
    await redis.hset(key, mapping=fields)


async def test_rpm_is_exact(limiter: RedisLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=5))
    for i in range(5):
        admission = await take(limiter, key)
        assert (admission.allowed, admission.limit_requests) == (True, 5)
        assert admission.remaining_requests == 4 - i
    refused = await take(limiter, key)
    assert (refused.allowed, refused.reason, refused.ticket) == (False, "rpm", None)
    assert refused.remaining_requests == 0
    assert 59.0 < refused.retry_after <= 61.0
    assert refused.reset_requests == pytest.approx(refused.retry_after, abs=0.01)


async def test_a_request_cancelled_while_waiting_leaves_its_batch_answered(
    limiter: RedisLimiter,
) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=10))
    waiting = [asyncio.ensure_future(take(limiter, key)) for _ in range(3)]
    await asyncio.sleep(0)  # the three are queued in the turn's batch, not yet sent
    waiting[1].cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.allowed for r in (results[0], results[2]) if isinstance(r, Admission)] == [
        True,
        True,
    ]
    # The cancelled request went out with its batch and stays counted (see the module).
    assert (await take(limiter, key)).remaining_requests == 10 - 4


async def test_window_rolls(redis: aioredis.Redis, limiter: RedisLimiter, prefix: str) -> None:
    """Seed buckets at known ages on Redis's clock and check what still counts."""
    now = await redis_now(redis)
    sec = int(now)
    # Bucket sec-61 has left the window (and must be deleted); sec-60 is its oldest bucket.
    await seed(redis, prefix + "key:a:r", {sec - 61: 100, sec - 60: 4, sec - 30: 6})

    refused = await take(limiter, LimitScope("key:a", LimitSpec(rpm=10)))
    assert refused.reason == "rpm"
    assert refused.retry_after == pytest.approx(sec + 1 - now, abs=0.05)  # sec-60 leaves next
    assert await redis.hexists(prefix + "key:a:r", str(sec - 61)) == 0
    assert await redis.hmget(prefix + "key:a:r", ["s", "o"]) == [b"10", str(sec - 60).encode()]

    # With rpm 6, 5 of the 10 must leave: sec-60 (4) is not enough, sec-30 is needed too.
    refused = await take(limiter, LimitScope("key:a", LimitSpec(rpm=6)))
    assert refused.retry_after == pytest.approx(sec + 31 - now, abs=0.05)

    admitted = await take(limiter, LimitScope("key:a", LimitSpec(rpm=11)))
    assert admitted.allowed
    assert admitted.remaining_requests == 0
    assert admitted.reset_requests == pytest.approx(sec + 1 - now, abs=0.05)


@pytest.mark.parametrize("age", [200, 1000])  # walked second by second / rebuilt from scratch
async def test_a_window_that_has_left_entirely_is_dropped(
    redis: aioredis.Redis, limiter: RedisLimiter, prefix: str, age: int
) -> None:
    sec = int(await redis_now(redis))
    await seed(redis, prefix + "key:a:r", {sec - age: 5, sec - 61: 5})
    admitted = await take(limiter, LimitScope("key:a", LimitSpec(rpm=1)))
    assert (admitted.allowed, admitted.remaining_requests) == (True, 0)
    fields = await redis.hgetall(prefix + "key:a:r")
    assert fields == {str(sec).encode(): b"1", b"s": b"1", b"o": str(sec).encode()}


async def test_tpm_reserve_refund_and_charge(limiter: RedisLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000))
    first = await take(limiter, key, tokens=600)
    assert (first.limit_tokens, first.remaining_tokens) == (1000, 400)

    refused = await take(limiter, key, tokens=600)
    assert (refused.allowed, refused.reason) == (False, "tpm")
    assert 0 < refused.retry_after <= 61

    await limiter.settle(ticket_of(first), 100)  # refund 500
    second = await take(limiter, key, tokens=600)
    assert second.remaining_tokens == 300

    await limiter.settle(ticket_of(second), 1500)  # charge 900 past the reservation
    blocked = await take(limiter, key, tokens=1)
    assert (blocked.allowed, blocked.reason, blocked.remaining_tokens) == (False, "tpm", 0)

    never = await take(limiter, LimitScope("key:b", LimitSpec(tpm=100)), tokens=101)
    assert (never.allowed, never.reason, never.retry_after) == (False, "tpm", 60.0)


async def test_tpm_retry_after_from_seeded_buckets(
    redis: aioredis.Redis, limiter: RedisLimiter, prefix: str
) -> None:
    now = await redis_now(redis)
    sec = int(now)
    await seed(redis, prefix + "key:a:t", {sec - 50: 300, sec - 20: 500})
    refused = await take(limiter, LimitScope("key:a", LimitSpec(tpm=1000)), tokens=400)
    assert refused.retry_after == pytest.approx(sec + 11 - now, abs=0.05)
    refused = await take(limiter, LimitScope("key:a", LimitSpec(tpm=1000)), tokens=600)
    assert refused.retry_after == pytest.approx(sec + 41 - now, abs=0.05)


async def test_parallel_slots_and_lease_expiry(limiter: RedisLimiter, prefix: str) -> None:
    key = LimitScope("key:a", LimitSpec(max_parallel=2))
    a = await take(limiter, key)
    client = _wire()
    try:  # b's replica goes away without settling it: its lease is no longer renewed
        gone = RedisLimiter(client, prefix=prefix, failure_mode="closed")
        # Long enough for the checks below on a loaded machine (0.05 s flaked in CI).
        ticket_of(await take(gone, key, lease=1.0))
        await gone.close()
    finally:
        await client.close()
    refused = await take(limiter, key)
    assert (refused.allowed, refused.reason, refused.retry_after) == (False, "parallel", 1.0)

    await limiter.settle(ticket_of(a), 0)
    c = await take(limiter, key)
    assert c.allowed
    assert not (await take(limiter, key)).allowed
    await asyncio.sleep(1.1)  # b's lease expires without a settle
    assert (await take(limiter, key)).allowed


async def test_all_or_nothing_over_scopes(limiter: RedisLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(rpm=10, tpm=1000, max_parallel=5))
    model = LimitScope("key:a:model:m", LimitSpec(rpm=1))
    assert (await take(limiter, key, model, tokens=100)).allowed
    refused = await take(limiter, key, model, tokens=100)
    assert (refused.allowed, refused.reason) == (False, "rpm")
    alone = await take(limiter, key, tokens=100)
    assert (alone.remaining_requests, alone.remaining_tokens) == (8, 800)
    for _ in range(3):
        assert (await take(limiter, key)).allowed
    assert not (await take(limiter, key)).allowed  # 5 slots: 1 + 1 + 3


async def test_settle_is_idempotent(limiter: RedisLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=1000, max_parallel=1))
    first = ticket_of(await take(limiter, key, tokens=600))
    await limiter.settle(first, 100)
    second = ticket_of(await take(limiter, key, tokens=100))
    await limiter.settle(first, 100)
    assert not (await take(limiter, key)).allowed
    await limiter.settle(second, 100)
    assert (await take(limiter, key)).remaining_tokens == 800


def count_calls(limiter: RedisLimiter, script: str) -> list[None]:
    """Wrap one of the limiter's scripts; the list grows by one per call."""
    calls: list[None] = []
    inner = getattr(limiter, script)

    class Counting:
        def send(self, keys: int, items: int, body: bytes, sink: Sink) -> bool:
            sent = bool(inner.send(keys, items, body, sink))
            if sent:  # (not sent: no connection yet; sent again once it is open)
                calls.append(None)
            return sent

    setattr(limiter, script, Counting())
    return calls


async def test_acquires_of_one_loop_turn_share_one_call(limiter: RedisLimiter) -> None:
    calls = count_calls(limiter, "_script")
    key = LimitScope("key:a", LimitSpec(rpm=30, tpm=10_000))
    other = LimitScope("key:b", LimitSpec(rpm=100))
    model = LimitScope("key:a:model:m", LimitSpec(rpm=20))
    # 50 requests in one turn, two keys, some with a per-model scope: each is all or
    # nothing over its own scopes, in order.
    answers = await asyncio.gather(
        *(take(limiter, key, model, tokens=100) if i % 2 else take(limiter, key, other)
          for i in range(50))
    )  # fmt: skip
    assert len(calls) == 1
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 30  # key:a's RPM, exactly
    with_model = [a for i, a in enumerate(answers) if i % 2 and a.allowed]
    assert len(with_model) <= 20
    refused = [a for a in answers if not a.allowed]
    assert {a.reason for a in refused} == {"rpm"}
    assert all(0 < a.retry_after <= 61 for a in refused)
    assert (await take(limiter, other)).remaining_requests == 100 - 15 - 1


async def test_settles_of_one_loop_turn_share_one_call(limiter: RedisLimiter) -> None:
    key = LimitScope("key:a", LimitSpec(tpm=100_000, max_parallel=40))
    model = LimitScope("key:a:model:m", LimitSpec(tpm=50_000, max_parallel=40))
    tickets = [ticket_of(await take(limiter, key, model, tokens=1000)) for _ in range(40)]
    assert not (await take(limiter, key)).allowed  # every slot is taken

    calls = count_calls(limiter, "_script")
    # 40 requests end together: 20 used fewer tokens than reserved, 20 exactly as many.
    await asyncio.gather(
        *(limiter.settle(t, 400 if i % 2 else 1000) for i, t in enumerate(tickets))
    )
    assert len(calls) == 1
    after = await take(limiter, key, model, tokens=0)
    assert after.allowed  # every slot freed
    # 40 x 1000 reserved, 20 x 600 refunded, in both scopes; the tighter one is reported.
    assert after.remaining_tokens == 50_000 - 28_000


async def test_keys_carry_ttls(redis: aioredis.Redis, limiter: RedisLimiter, prefix: str) -> None:
    await take(limiter, LimitScope("key:a", LimitSpec(rpm=5, tpm=50, max_parallel=2)), lease=600)
    for suffix, low, high in ((":r", 100, 120), (":t", 100, 120), (":p", 700, 720)):
        ttl = await redis.ttl(prefix + "key:a" + suffix)
        assert low <= ttl <= high, suffix


async def test_three_replicas_admit_exactly_the_limit(prefix: str) -> None:
    clients = [_wire() for _ in range(3)]
    try:
        failures: list[Exception] = []
        replicas = [RedisLimiter(c, prefix=prefix, on_failure=failures.append) for c in clients]
        key = LimitScope("key:shared", LimitSpec(rpm=600))
        results = await asyncio.gather(
            *(take(replica, key) for replica in replicas for _ in range(400))
        )
    finally:
        for client in clients:
            await client.close()
    assert failures == []
    allowed = [r for r in results if r.allowed]
    refused = [r for r in results if not r.allowed]
    assert len(allowed) == 600
    assert all(r.reason == "rpm" and 0 < r.retry_after <= 61 for r in refused)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


async def test_settle_nowait_is_sent_in_the_background(redis: aioredis.Redis, prefix: str) -> None:
    """The request path's settle: queued without a coroutine, sent with its loop turn's
    other settles; close() sends what is still queued."""
    client = _wire()
    try:
        limiter = RedisLimiter(client, prefix=prefix)
        key = LimitScope("key:a", LimitSpec(tpm=1000, max_parallel=2))
        first = await take(limiter, key, tokens=600)
        second = await take(limiter, key, tokens=300)
        assert (first.remaining_tokens, second.remaining_tokens) == (400, 100)
        calls = count_calls(limiter, "_script")
        limiter.settle_nowait(ticket_of(first), 100)  # refund 500, free a slot
        assert calls == []  # queued: nothing is sent before the loop runs again
        await limiter.settle(ticket_of(first), 100)  # already claimed: waits for the batch
        assert len(calls) == 1
        assert await redis.hget(prefix + "key:a:t", "s") == b"400"
        assert await redis.zcard(prefix + "key:a:p") == 1

        limiter.settle_nowait(ticket_of(second), 300)  # frees the last slot, no token change
        await limiter.close()
        assert len(calls) == 2
        assert await redis.zcard(prefix + "key:a:p") == 0
    finally:
        await client.close()


async def _silent_server() -> asyncio.Server:
    """Accepts connections and never answers: every command times out."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    return await asyncio.start_server(hold, HOST, 0)


async def test_fails_open_when_redis_is_unreachable() -> None:
    failures: list[Exception] = []
    client = _wire(port=_closed_port(), timeout=0.2)
    limiter = RedisLimiter(client, on_failure=failures.append)
    try:
        admission = await take(limiter, LimitScope("key:a", LimitSpec(rpm=1)), tokens=10)
        assert admission.allowed
        assert admission.limit_requests is None
        await limiter.settle(ticket_of(admission), 50)  # a no-op, no second failure
        assert len(failures) == 1
    finally:
        await client.close()


async def test_fails_open_when_redis_times_out() -> None:
    server = await _silent_server()
    port = server.sockets[0].getsockname()[1]
    failures: list[Exception] = []
    client = _wire(port=port, timeout=0.1)
    try:
        limiter = RedisLimiter(client, on_failure=failures.append)
        assert (await take(limiter, LimitScope("key:a", LimitSpec(rpm=1)))).allowed
        assert len(failures) == 1
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_fails_closed_when_redis_is_unreachable() -> None:
    failures: list[Exception] = []
    client = _wire(port=_closed_port(), timeout=0.2)
    limiter = RedisLimiter(client, failure_mode="closed", on_failure=failures.append)
    try:
        with pytest.raises(ServiceUnavailableError) as raised:
            await take(limiter, LimitScope("key:a", LimitSpec(rpm=1)))
        assert raised.value.headers == {"Retry-After": "1"}
        assert raised.value.http_status == 503
        assert len(failures) == 1
        # No scope limits anything: no round trip, so no failure either.
        assert (await take(limiter, LimitScope("key:a", LimitSpec()))).allowed
    finally:
        await client.close()
