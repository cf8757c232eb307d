"""The lean upstream client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sluice.backends.http1 import HTTP1Pool
from sluice.errors import UpstreamConnectError, UpstreamTimeoutError
from tests.gateway import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"Content-Type: application/json\r\n"


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw HTTP server; yields its base URL and the list of connections it accepted."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[1])
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        yield f"http://127.0.0.1:{port}/v1", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def pool(url: str, read_timeout: float = 2.0) -> HTTP1Pool:
    return HTTP1Pool(url, max_connections=4, connect_timeout=1.0, read_timeout=read_timeout)


def response(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection_and_sends_the_request_whole() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(response(b'{"ok": true}'))

    async with server(handler) as (url, connections):
        client = pool(url)
        for _ in range(3):
            reply = await client.post("/chat/completions", HEAD, b'{"a": 1}')
            assert reply.status == 200
            assert reply.body == b'{"ok": true}'
        await client.close()
    assert len(connections) == 1
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    assert seen[0].endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')


async def test_a_connection_the_server_closed_while_idle_is_replaced_transparently() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"first"))  # claims keep-alive, then hangs up
        await writer.drain()

    async with server(handler) as (url, connections):
        client = pool(url)
        assert (await client.post("/x", HEAD, b"{}")).body == b"first"
        await asyncio.sleep(0.05)
        assert (await client.post("/x", HEAD, b"{}")).body == b"first"
        await client.close()
    assert len(connections) == 2


async def test_chunked_and_until_close_bodies() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"hello ", b"world"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length here")

    for handler in (chunked, until_close):
        async with server(handler) as (url, _):
            client = pool(url)
            reply = await client.post("/x", HEAD, b"{}")
            assert reply.body in (b"hello world", b"no length here")
            await client.close()


async def test_streaming_arrives_piece_by_piece_and_big_bodies_survive_backpressure() -> None:
    big = b"x" * (3 * 1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(big) + 5))
        writer.write(b"first")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(big)
        await writer.drain()

    async with server(handler) as (url, _):
        client = pool(url)
        loop = asyncio.get_running_loop()
        conn, chunks = await client.open_stream("/x", HEAD, b"{}", loop.time() + 10)
        first = await anext(chunks)
        assert first == b"first"
        rest = b"".join([chunk async for chunk in chunks])
        assert rest == big
        assert conn.keep_alive
        client.finish(conn)
        await client.close()


async def test_failures_map_to_upstream_errors() -> None:
    with pytest.raises(UpstreamConnectError, match="unreachable"):
        await pool(f"http://127.0.0.1:{free_port()}/v1").post("/x", HEAD, b"{}")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")

    async with server(silent) as (url, _):
        with pytest.raises(UpstreamTimeoutError):
            await pool(url, read_timeout=0.2).post("/x", HEAD, b"{}")
    async with server(reset_mid_body) as (url, _):
        with pytest.raises(UpstreamConnectError, match="mid-response"):
            await pool(url).post("/x", HEAD, b"{}")
    async with server(garbage) as (url, _):
        with pytest.raises(UpstreamConnectError, match="malformed"):
            await pool(url).post("/x", HEAD, b"{}")


async def test_connection_cap_queues_requests() -> None:
    active = 0
    peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active, peak
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.02)
            active -= 1
            writer.write(response(b"{}"))

    async with server(handler) as (url, connections):
        client = HTTP1Pool(url, max_connections=2, connect_timeout=1, read_timeout=2)
        await asyncio.gather(*(client.post("/x", HEAD, b"{}") for _ in range(8)))
        await client.close()
    assert peak == 2
    assert len(connections) == 2


async def test_gzip_bodies_are_decoded_by_the_backend() -> None:
    from sluice.backends.base import UpstreamCall
    from sluice.backends.openai_http import OpenAIHTTPBackend
    from sluice.settings import OpenAIDeployment

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(gzip.compress(b'{"z": 1}'), b"Content-Encoding: gzip\r\n"))

    async with server(handler) as (url, _):
        backend = OpenAIHTTPBackend("b", OpenAIDeployment(provider="openai", api_base=url), None)
        await backend.start()
        reply = await backend.send(UpstreamCall("completions", {"model": "m"}, None, "rid"))
        await backend.close()
    assert reply.body == b'{"z": 1}'


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_upstreams_are_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(response(b"over tls"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        url = f"https://localhost:{port}/v1"
        trusted = HTTP1Pool(url, 2, connect_timeout=2, read_timeout=2, ca_file=str(cert))
        assert (await trusted.post("/x", HEAD, b"{}")).body == b"over tls"
        await trusted.close()
        with pytest.raises(UpstreamConnectError, match=r"^upstream u: TLS handshake failed$"):
            await HTTP1Pool(url, 2, 2, 2, name="u").post("/x", HEAD, b"{}")
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # the detail is for the operator's log
