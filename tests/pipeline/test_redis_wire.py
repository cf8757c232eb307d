"""The limiter's pipelined Redis client against the real server."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from sluice.pipeline.limits.wire import PipelinedRedis, bulk, bulks
from tests.gateway import free_port
from tests.services import require_redis

pytestmark = pytest.mark.redis


async def test_commands_and_replies_pair_up_under_concurrency() -> None:
    client = PipelinedRedis(require_redis())
    key = f"sluice:test:{secrets.token_hex(4)}"
    try:
        results = await asyncio.gather(*(client.execute("INCR", key) for _ in range(300)))
        assert sorted(results) == list(range(1, 301))
        echoes = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(50)))
        assert echoes == [f"m{i}".encode() for i in range(50)]
    finally:
        await client.execute("DEL", key)
        await client.close()


async def test_error_replies_raise_response_error_for_that_call_only() -> None:
    client = PipelinedRedis(require_redis())
    try:
        results = await asyncio.gather(
            client.execute("PING"), client.execute("NOSUCHCOMMAND"), client.execute("PING"),
            return_exceptions=True,
        )  # fmt: skip
        assert results[0] == b"PONG"
        assert isinstance(results[1], ResponseError)
        assert results[2] == b"PONG"
    finally:
        await client.close()


def test_bulk_strings_are_resp() -> None:
    assert bulk(b"") == b"$0\r\n\r\n"
    assert bulks("k\u00e9y", -12, b"x\r\ny") == b"$4\r\nk\xc3\xa9y\r\n$3\r\n-12\r\n$4\r\nx\r\ny\r\n"


async def test_packed_script_calls_match_plain_ones_and_survive_a_script_flush() -> None:
    url = require_redis()
    client = PipelinedRedis(url)
    script = client.register_script(
        f"return {{KEYS[1], KEYS[2], ARGV[1], ARGV[2], #ARGV, '{secrets.token_hex(4)}'}}"
    )
    admin = aioredis.Redis.from_url(url)
    try:
        body = bulks("k1", "k\u00e9") + bulk(b"7") + bulks("a b", 3)
        first = await script.run_packed(2, 5, body)
        assert first == await script(keys=["k1", "k\u00e9"], args=[7, "a b", 3])
        assert first[:5] == [b"k1", "k\u00e9".encode(), b"7", b"a b", 3]
        await admin.script_flush()
        assert await script.run_packed(2, 5, body) == first  # NOSCRIPT -> EVAL
    finally:
        await admin.aclose()
        await client.close()


async def test_scripts_survive_a_script_flush() -> None:
    url = require_redis()
    client = PipelinedRedis(url)
    script = client.register_script(f"return {{KEYS[1], ARGV[1], '{secrets.token_hex(4)}'}}")
    admin = aioredis.Redis.from_url(url)
    try:
        first = await script(keys=["k"], args=[7])
        await admin.script_flush()
        assert await script(keys=["k"], args=[7]) == first  # NOSCRIPT -> EVAL
        assert first[:2] == [b"k", b"7"]
    finally:
        await admin.aclose()
        await client.close()


async def test_reconnects_after_the_connection_is_killed() -> None:
    url = require_redis()
    client = PipelinedRedis(url)
    admin = aioredis.Redis.from_url(url)
    try:
        await client.execute("CLIENT", "SETNAME", "sluice-wire-test")
        await admin.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
        await asyncio.sleep(0.05)
        assert await client.execute("PING") == b"PONG"
    finally:
        await admin.aclose()
        await client.close()


async def test_unreachable_server_fails_fast() -> None:
    client = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    with pytest.raises(ConnectionError):
        await client.execute("PING")


async def test_a_server_that_stops_answering_fails_calls_with_a_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(5)
        finally:
            writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            client.execute("PING"), client.execute("PING"), return_exceptions=True
        )
        elapsed = asyncio.get_running_loop().time() - started
        await client.close()
    assert all(isinstance(r, TimeoutError) for r in results)
    assert elapsed < 1.0
