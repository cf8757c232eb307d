"""Hostile or broken upstreams: raw loopback servers that send exactly the bytes chosen here.

Each test names the hole it closes (issue 18, point 8); docs/security.md has the threat.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib

import httpx
import pytest

from sluice.backends.base import UpstreamCall
from sluice.backends.http1 import HTTP1Pool
from sluice.backends.openai_http import OpenAIHTTPBackend
from sluice.errors import UpstreamAuthError, UpstreamConnectError, UpstreamError
from sluice.settings import OpenAIDeployment
from tests.backends.test_http1 import HEAD, pool, read_request, response, server
from tests.gateway import config_for, free_port, running_gateway

CALL = UpstreamCall("chat/completions", {"model": "m", "messages": []}, None, "rid")


def backend(url: str, **settings: object) -> OpenAIHTTPBackend:
    spec = OpenAIDeployment(provider="openai", api_base=url, **settings)
    return OpenAIHTTPBackend("dep-1", spec, "sk-operator-secret-123456")


# -- 1xx interim responses --------------------------------------------------------------


async def test_interim_responses_are_skipped_not_taken_as_the_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # the final answer in a later read
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
            writer.write(response(b'{"final": true}', b"X-Final: 1\r\n"))

    async with server(handler) as (url, connections):
        client = pool(url)
        for _ in range(2):
            reply = await client.post("/x", HEAD, b"{}")
            assert (reply.status, reply.body) == (200, b'{"final": true}')
            assert b"link" not in reply.headers
            assert reply.headers[b"x-final"] == b"1"
        loop = asyncio.get_running_loop()
        conn, chunks = await client.open_stream("/x", HEAD, b"{}", loop.time() + 5)
        assert conn.status == 200
        assert b"".join([c async for c in chunks]) == b'{"final": true}'
        client.finish(conn)
        await client.close()
    assert len(connections) == 1  # still one healthy keep-alive connection


async def test_switching_protocols_without_an_upgrade_request_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\nbinary junk")

    async with server(handler) as (url, _):
        with pytest.raises(UpstreamConnectError, match="malformed"):
            await pool(url).post("/x", HEAD, b"{}")


# -- bytes nobody asked for ---------------------------------------------------------------


async def test_a_second_response_in_the_same_packet_is_not_read_and_kills_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = (await read_request(reader)).rsplit(b"\r\n\r\n", 1)[1]
            except asyncio.IncompleteReadError:
                return
            if body == b"1":  # the answer, and a stale one glued behind it
                writer.write(response(b"first") + response(b"stale"))
            else:
                writer.write(response(b"answer to " + body))

    async with server(handler) as (url, connections):
        client = pool(url)
        assert (await client.post("/x", HEAD, b"1")).body == b"first"
        assert (await client.post("/x", HEAD, b"2")).body == b"answer to 2"
        await client.close()
    assert len(connections) == 2  # the connection that carried the extra bytes was dropped


async def test_bytes_arriving_on_an_idle_connection_retire_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = (await read_request(reader)).rsplit(b"\r\n\r\n", 1)[1]
            except asyncio.IncompleteReadError:
                return
            writer.write(response(b"answer to " + body))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(response(b"late duplicate"))  # while the client holds it idle

    async with server(handler) as (url, connections):
        client = pool(url)
        assert (await client.post("/x", HEAD, b"1")).body == b"answer to 1"
        await asyncio.sleep(0.1)
        assert (await client.post("/x", HEAD, b"2")).body == b"answer to 2"
        await client.close()
    assert len(connections) == 2


async def test_extra_bytes_after_a_stream_keep_it_out_of_the_pool() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"data: x\n\n") + b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(0.5)

    async with server(handler) as (url, _):
        client = pool(url)
        loop = asyncio.get_running_loop()
        conn, chunks = await client.open_stream("/x", HEAD, b"{}", loop.time() + 5)
        assert b"".join([c async for c in chunks]) == b"data: x\n\n"
        assert not conn.keep_alive
        client.finish(conn)
        assert not client._idle
        await client.close()


# -- a POST is never sent twice -------------------------------------------------------------


async def test_a_post_is_not_resent_when_a_reused_connection_breaks_after_the_write() -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                body = (await read_request(reader)).rsplit(b"\r\n\r\n", 1)[1]
            except asyncio.IncompleteReadError:
                return
            received.append(body)
            if body == b"2":
                writer.transport.abort()  # acted on the POST, then the connection died
                return
            writer.write(response(b"ok"))

    async with server(handler) as (url, _):
        client = pool(url)
        assert (await client.post("/x", HEAD, b"1")).body == b"ok"
        with pytest.raises(UpstreamConnectError) as caught:
            await client.post("/x", HEAD, b"2")
        assert caught.value.code == "upstream_reset"
        assert "not re-sent" in caught.value.message
        assert (await client.post("/x", HEAD, b"3")).body == b"ok"
        await client.close()
    assert received == [b"1", b"2", b"3"]  # "2" reached the upstream exactly once


# -- sizes and encodings ----------------------------------------------------------------------


def _serve(payload: bytes):  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(payload)
            await writer.drain()

    return handler


async def test_a_body_over_the_cap_is_a_502_and_the_default_cap_is_32_mib() -> None:
    assert OpenAIDeployment(provider="openai", api_base="http://x/v1").max_response_bytes == (
        32 * 1024 * 1024
    )
    big = b"x" * (2 * 1024 * 1024)
    async with server(_serve(response(big))) as (url, _):
        small = backend(url, max_response_bytes=1024 * 1024)
        await small.start()
        with pytest.raises(UpstreamError) as caught:
            await small.send(CALL)
        await small.close()
        large = backend(url, max_response_bytes=4 * 1024 * 1024)
        await large.start()
        assert (await large.send(CALL)).body == big
        await large.close()
    assert caught.value.http_status == 502
    assert caught.value.code == "upstream_response_too_large"
    assert "1048576 bytes" in caught.value.message


async def test_a_chunked_body_without_length_is_capped_too() -> None:
    part = b"y" * 65536
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    payload = head + (b"%x\r\n%s\r\n" % (len(part), part)) * 40 + b"0\r\n\r\n"
    async with server(_serve(payload)) as (url, _):
        client = HTTP1Pool(url, 2, 1, 2, max_body=1024 * 1024)
        with pytest.raises(UpstreamError, match="larger than the limit"):
            await client.post("/x", HEAD, b"{}")
        await client.close()


async def test_the_gateway_asks_for_no_compression() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request(reader))
        writer.write(response(b"{}"))

    async with server(handler) as (url, _):
        b = backend(url)
        await b.start()
        await b.send(CALL)
        await b.close()
    assert b"\r\nAccept-Encoding: identity\r\n" in heads[0]


async def test_a_gzip_bomb_is_decoded_no_further_than_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    payload = response(bomb, b"Content-Encoding: gzip\r\n")
    async with server(_serve(payload)) as (url, _):
        b = backend(url, max_response_bytes=1024 * 1024)
        await b.start()
        with pytest.raises(UpstreamError) as caught:
            await b.send(CALL)
        await b.close()
    assert caught.value.code == "upstream_response_too_large"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"br", b"\x1b\x03\x00\xf8"),
        (b"gzip, br", gzip.compress(b"{}")),
        (b"gzip", b"not gzip at all"),
        (b"gzip", gzip.compress(b'{"long": "' + b"a" * 1000 + b'"}')[:-20]),  # truncated
        (b"deflate", zlib.compress(b"{}")[:-3]),
    ],
)
async def test_unasked_or_broken_encodings_are_a_502(encoding: bytes, body: bytes) -> None:
    payload = response(body, b"Content-Encoding: " + encoding + b"\r\n")
    async with server(_serve(payload)) as (url, _):
        b = backend(url)
        await b.start()
        with pytest.raises(UpstreamError) as caught:
            await b.send(CALL)
        await b.close()
    assert caught.value.http_status == 502
    assert caught.value.code == "upstream_bad_encoding"


async def test_a_compressed_stream_is_refused() -> None:
    payload = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    async with server(_serve(payload)) as (url, _):
        b = backend(url)
        await b.start()
        with pytest.raises(UpstreamError) as caught:
            async with b.stream(CALL):
                pass
        await b.close()
    assert caught.value.code == "upstream_bad_encoding"


# -- what clients are told ----------------------------------------------------------------------


async def test_connection_failures_name_the_deployment_not_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    b = backend(f"http://127.0.0.1:{port}/v1")
    await b.start()
    caplog.set_level(logging.WARNING, "sluice.upstream")
    with pytest.raises(UpstreamConnectError) as caught:
        await b.send(CALL)
    await b.close()
    assert caught.value.message == "upstream dep-1 unreachable"
    body = caught.value.body().decode()
    assert str(port) not in body
    assert "127.0.0.1" not in body
    assert "Error" not in body
    assert f"127.0.0.1:{port}" in caplog.text
    assert "ConnectionRefusedError" in caplog.text


async def test_malformed_answers_do_not_echo_parser_text() -> None:
    async with server(_serve(b"HTTP/1.1 2OO OK\r\n\r\n")) as (url, _):
        b = backend(url)
        await b.start()
        with pytest.raises(UpstreamConnectError) as caught:
            await b.send(CALL)
        await b.close()
    assert caught.value.message == "upstream dep-1: malformed HTTP response"


async def _open_stream(b: OpenAIHTTPBackend) -> None:
    async with b.stream(CALL):
        pass


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_auth_failures_are_not_relayed(
    status: int, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_body = (
        b'{"error": {"message": "Incorrect API key provided: sk-opera****3456. Your key '
        b'sk-operator-secret-123456 belongs to org-acme", "type": "invalid_request_error"}}'
    )
    payload = b"HTTP/1.1 %d Unauthorized\r\nContent-Type: application/json\r\n" % status
    payload += b"Content-Length: %d\r\n\r\n%s" % (len(upstream_body), upstream_body)
    async with server(_serve(payload)) as (url, _):
        b = backend(url)
        await b.start()
        caplog.set_level(logging.WARNING, "sluice.upstream")
        with pytest.raises(UpstreamAuthError) as caught:
            await (_open_stream(b) if stream else b.send(CALL))
        await b.close()
    error = caught.value
    assert (error.http_status, error.code) == (502, "upstream_auth_failed")
    assert b"Incorrect" not in error.body()
    assert b"sk-" not in error.body()
    assert "dep-1" in error.message
    assert f"HTTP {status}" in caplog.text
    assert "Incorrect API key provided" in caplog.text
    assert "sk-operator-secret-123456" not in caplog.text
    assert "sk-opera" not in caplog.text


# -- end to end: what a client of the gateway sees ----------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_the_gateway_answers_an_upstream_auth_failure_with_its_own_502(
    gateway: str, status: int
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(
        f"{gateway}/chat/completions", json={**body, "mock": {"status": status}}, timeout=10
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_auth_failed"
    assert "mock injected" not in response.text  # the upstream's words stay in the log


def test_the_gateway_does_not_tell_clients_the_upstream_address() -> None:
    port = free_port()
    with running_gateway(config_for(f"http://127.0.0.1:{port}/v1")) as url:
        response = httpx.post(
            f"{url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
    assert response.status_code == 503  # every call failed to connect: the deployment is down
    assert response.json()["error"]["message"] == (
        "No deployment of the model 'gpt-4o-mini' could be reached (3 attempts); retry later."
    )
    assert str(port) not in response.text
