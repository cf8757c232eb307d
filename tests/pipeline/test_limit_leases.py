"""Parallel-slot leases of the Redis limiter against a real Redis: short, renewed while the
request runs, released when an acquire's reply was lost (issue 18, point 9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.limits import LimitScope, LimitSpec, RedisLimiter
from sluice.pipeline.limits.wire import PipelinedRedis
from sluice.services import build_services
from sluice.settings import AuthSettings, Settings, UsageSettings
from tests.pipeline.test_limits_redis import HOST, PORT, _wire, take, ticket_of

pytestmark = pytest.mark.redis

ONE_SLOT = LimitScope("key:a", LimitSpec(max_parallel=1))


async def wait_for(condition: Callable[[], object], within: float) -> float:
    """Poll the async ``condition`` until true; the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await condition():  # type: ignore[misc]
        if loop.time() - start > within:
            raise AssertionError(f"not within {within} s")
        await asyncio.sleep(0.02)
    return loop.time() - start


def test_the_gateway_leases_parallel_slots_for_seconds_not_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a 900 s lease held a slot for 15 minutes after a lost reply."""
    monkeypatch.setenv("SLUICE_TEST_LEASES_MASTER", "sk-test-master-leases")
    settings = Settings(
        redis_url=f"redis://{HOST}:{PORT}/0",
        auth=AuthSettings(master_key="os.environ/SLUICE_TEST_LEASES_MASTER"),
        usage=UsageSettings(enabled=False),
        data_dir=str(tmp_path),
    )
    services = build_services(settings, GatewayMetrics(CollectorRegistry()))
    assert services.admit is not None
    assert services.admit._lease == settings.limits.redis_lease_seconds == 30.0


async def test_a_lease_not_renewed_expires_after_its_short_time(
    redis: aioredis.Redis, prefix: str
) -> None:
    client, other = _wire(), _wire()
    try:
        crashed = RedisLimiter(client, prefix=prefix)
        ticket_of(await take(crashed, ONE_SLOT, lease=0.4))
        await crashed.close()  # its replica is gone: nobody renews or settles the lease
        survivor = RedisLimiter(other, prefix=prefix)
        assert not (await take(survivor, ONE_SLOT)).allowed
        waited = await wait_for(lambda: _allowed(survivor), within=2.0)
        assert 0.2 < waited < 1.5
        await survivor.close()
    finally:
        await client.close()
        await other.close()


async def _allowed(limiter: RedisLimiter) -> bool:
    admission = await take(limiter, ONE_SLOT)
    if admission.allowed:
        await limiter.settle(ticket_of(admission), 0)
    return admission.allowed


async def test_a_long_request_keeps_its_slot_past_several_leases(
    redis: aioredis.Redis, prefix: str
) -> None:
    client = _wire()
    try:
        limiter = RedisLimiter(client, prefix=prefix)
        held = ticket_of(await take(limiter, ONE_SLOT, lease=0.3))
        for _ in range(4):  # 1.2 s: four leases, renewed every 0.1 s
            await asyncio.sleep(0.3)
            assert not (await take(limiter, ONE_SLOT, lease=0.3)).allowed
        seconds, micros = await redis.time()
        expiry = await redis.zscore(prefix + "key:a:p", held.request_id)
        assert expiry is not None
        assert expiry > seconds * 1000 + micros / 1000
        await limiter.settle(held, 0)
        assert await redis.zcard(prefix + "key:a:p") == 0
        # A settled lease is not brought back by a renewal in flight or to come (ZADD XX).
        await limiter.leases.renew()
        assert await redis.zcard(prefix + "key:a:p") == 0
        assert (await take(limiter, ONE_SLOT, lease=0.3)).allowed
        await limiter.close()
    finally:
        await client.close()


class ReplyDropper:
    """A TCP proxy in front of Redis that passes every command on and, while ``dropping``,
    swallows Redis's replies: a script that ran but whose reply was lost."""

    def __init__(self) -> None:
        self.dropping = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        self._writers += (writer, up_writer)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, drop: Callable[[], bool]
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not drop():
                        sink.write(data)
                        await sink.drain()
            sink.close()

        await asyncio.gather(
            pump(reader, up_writer, lambda: False), pump(up_reader, writer, lambda: self.dropping)
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()


async def test_a_lost_reply_frees_its_slot_promptly(redis: aioredis.Redis, prefix: str) -> None:
    proxy = ReplyDropper()
    port = await proxy.start()
    client = PipelinedRedis(f"redis://{HOST}:{port}/0", timeout=0.2)
    failures: list[Exception] = []
    try:
        limiter = RedisLimiter(client, prefix=prefix, on_failure=failures.append)
        await limiter.settle(ticket_of(await take(limiter, ONE_SLOT)), 0)  # connected
        proxy.dropping = True
        lost = await take(limiter, ONE_SLOT, lease=900)  # the script runs; its reply is lost
        assert lost.allowed  # failed open, with a ticket that holds nothing
        assert lost.ticket is not None
        assert lost.ticket.noop
        assert failures
        # Redis took the slot for a request the gateway never got a ticket for.
        assert await redis.zcard(prefix + "key:a:p") >= 1
        proxy.dropping = False  # Redis answers again: the release goes through
        await wait_for(lambda: _slots_free(redis, prefix), within=3.0)
        await limiter.close()
    finally:
        await client.close()
        await proxy.close()


async def _slots_free(redis: aioredis.Redis, prefix: str) -> bool:
    return await redis.zcard(prefix + "key:a:p") == 0


async def test_an_admission_whose_request_went_away_is_undone(
    redis: aioredis.Redis, prefix: str
) -> None:
    """A request cancelled while its acquire was in flight: its slot and tokens go back."""
    client = _wire()
    try:
        limiter = RedisLimiter(client, prefix=prefix)
        key = LimitScope("key:a", LimitSpec(tpm=1000, max_parallel=1))
        waiting = asyncio.ensure_future(take(limiter, key, tokens=400))
        await asyncio.sleep(0)  # queued in the turn's batch
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting

        async def everything_free() -> bool:  # the slot, and the 400 tokens refunded
            return (await take(limiter, key, tokens=1000)).allowed

        # (Refused, which changes nothing, until the undo has reached Redis.)
        await wait_for(everything_free, within=2.0)
        await limiter.close()
    finally:
        await client.close()
