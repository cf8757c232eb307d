"""Sluice's HTTP protocol (`sluice.http_protocol`) against uvicorn's own.

Both servers get the same requests, as raw bytes, from one small ASGI app; what they write
back must be the same bytes, but for the header block that only Sluice's protocol accepts.
Run after upgrading uvicorn: the protocol carries a copy of two of uvicorn's methods.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluice.http_protocol import HEADER_BLOCK, SluiceHttpProtocol
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway, serving

BLOCK = b"x-ratelimit-limit-requests: 7\r\nx-ratelimit-reset-requests: 1.500s\r\n"
BLOCK_AS_HEADERS = [
    (b"x-ratelimit-limit-requests", b"7"),
    (b"x-ratelimit-reset-requests", b"1.500s"),
]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    headers = [(b"content-type", b"text/plain")]
    if path == "/length":
        start = {"status": 200, "headers": [*headers, (b"content-length", b"5")]}
        bodies = [b"hello"]
    elif path == "/chunked":
        start, bodies = {"status": 200, "headers": headers}, [b"one", b"", b"two"]
    elif path == "/close":
        start = {"status": 200, "headers": [(b"content-length", b"2"), (b"Connection", b"close")]}
        bodies = [b"ok"]
    elif path == "/no-content":
        start, bodies = {"status": 204, "headers": []}, [b""]
    elif path == "/bad-value":
        start, bodies = {"status": 200, "headers": [(b"x-bad", b"a\nb")]}, [b""]
    elif path == "/block":
        start = {"status": 200, "headers": [(b"content-length", b"0")]}
        if HEADER_BLOCK in (scope.get("extensions") or ()):
            start[HEADER_BLOCK] = BLOCK
        else:
            start["headers"] += BLOCK_AS_HEADERS
        bodies = [b""]
    else:
        start, bodies = {"status": 404, "headers": [(b"content-length", b"0")]}, [b""]
    await send({"type": "http.response.start", **start})
    for i, body in enumerate(bodies):
        await send({"type": "http.response.body", "body": body, "more_body": i < len(bodies) - 1})


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` on one connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def get(path: str, method: str = "GET", version: str = "1.1", close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/{version}\r\nHost: t\r\n{connection}\r\n".encode()


REQUESTS = {
    "content-length": get("/length"),
    "chunked": get("/chunked"),
    "connection close from the app": get("/close", close=False),
    "204": get("/no-content"),
    "HEAD": get("/length", method="HEAD"),
    "HTTP/1.0": get("/length", version="1.0", close=False),
    "invalid header value": get("/bad-value"),
    "404": get("/missing"),
    "pipelined": get("/length", close=False) + get("/chunked", close=False) + get("/length"),
    "request body": (
        b"POST /length HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 4\r\n\r\nabcd"
    ),
}


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    options = {"lifespan": "off", "date_header": False, "server_header": False}
    with (
        serving(app, http="httptools", **options) as stock,
        serving(app, http=SluiceHttpProtocol, **options) as ours,
    ):
        yield stock, ours


@pytest.mark.parametrize("name", list(REQUESTS))
def test_same_bytes_as_uvicorn(ports: tuple[int, int], name: str) -> None:
    stock, ours = ports
    raw = REQUESTS[name]
    expected = exchange(stock, raw)
    assert exchange(ours, raw) == expected
    if name != "invalid header value":  # uvicorn closes the connection without a word
        assert expected.startswith(b"HTTP/1.1 ")


def test_the_header_block_is_written_as_ordinary_headers_would_be(
    ports: tuple[int, int],
) -> None:
    stock, ours = ports
    as_headers = exchange(stock, get("/block"))
    as_block = exchange(ours, get("/block"))
    assert b"x-ratelimit-limit-requests: 7\r\n" in as_headers  # uvicorn: no extension
    assert as_block == as_headers


@pytest.mark.parametrize("http", ["httptools", SluiceHttpProtocol], ids=["uvicorn", "sluice"])
def test_ratelimit_headers_through_either_server(
    http: type[asyncio.Protocol] | str, upstream: MockUpstream, tmp_path: Path
) -> None:
    master = "sk-master-for-protocol-tests-0123"
    os.environ["SLUICE_TEST_MASTER_KEY"] = master
    config = config_for(upstream.url)
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_MASTER_KEY"},
        usage={"enabled": False},
        data_dir=str(tmp_path),
    )
    with running_gateway(config, http=http) as url:
        base = url.removesuffix("/v1")
        admin = {"Authorization": f"Bearer {master}"}
        created = httpx.post(f"{base}/admin/keys", json={"rpm": 5, "tpm": 10_000}, headers=admin)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(
            f"{url}/chat/completions",
            json={**body, "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert reply.status_code == 200
    h = reply.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert h["x-ratelimit-limit-tokens"] == "10000"
    assert 0 < int(h["x-ratelimit-remaining-tokens"]) < 10_000
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert h[name].endswith("s"), h[name]
        assert 0 < float(h[name].removesuffix("s")) <= 61, h[name]
    assert h["content-type"] == "application/json"  # the ordinary headers are still there
    assert "x-request-id" in h
