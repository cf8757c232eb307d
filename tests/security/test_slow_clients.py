"""Slow and numerous clients: deadlines for headers and body, a connection cap, the
keep-alive idle timeout (issue 18, point 6). bench/slowloris.py is the load proof."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from sluice.http_protocol import (
    ConnectionLimits,
    SluiceHttpProtocol,
    check_uvicorn,
    protocol_factory,
)
from sluice.server import _uvicorn_options
from sluice.settings import Settings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway, serving

DEADLINE = 0.4
LIMITS = ConnectionLimits(header_timeout=DEADLINE, body_timeout=DEADLINE, max_connections=4)


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers with its length; says so if the client left."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with serving(echo, http=protocol_factory(LIMITS), lifespan="off", timeout_keep_alive=1) as p:
        yield p


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic()


def test_a_normal_request_is_served(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        answer, _ = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"\r\n\r\n5")


def test_headers_trickled_byte_by_byte_are_cut_at_the_deadline(port: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Padding: " + b"a" * 200
    with connect(port) as sock:
        started = time.monotonic()
        try:
            for byte in head:  # each byte well within the deadline, the whole far beyond
                sock.sendall(bytes([byte]))
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, closed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request_timeout" in answer
    assert DEADLINE * 0.9 <= closed - started < DEADLINE + 1


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(port: int) -> None:
    with connect(port) as sock:
        started = time.monotonic()
        answer, closed = read_until_closed(sock)
    assert answer == b""
    assert DEADLINE * 0.9 <= closed - started < DEADLINE + 1


def test_a_body_trickle_is_cut_at_the_deadline(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        try:
            for _ in range(100):
                sock.sendall(b"x")
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, closed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert DEADLINE * 0.9 <= closed - started < DEADLINE + 1


def test_the_deadlines_restart_for_each_request_on_a_kept_alive_connection(port: int) -> None:
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(port) as sock:
        for _ in range(3):  # together longer than one deadline, each well within it
            sock.sendall(request[:10])
            time.sleep(DEADLINE / 2)
            sock.sendall(request[10:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_connections_past_the_cap_are_refused_at_once(port: int) -> None:
    with ExitStack() as stack:
        held = [stack.enter_context(connect(port)) for _ in range(LIMITS.max_connections)]
        time.sleep(0.1)
        with connect(port) as extra:
            started = time.monotonic()
            answer, closed = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too_many_connections" in answer
        assert closed - started < DEADLINE / 2  # refused, not left to time out
        held[0].close()
        time.sleep(0.1)
        with connect(port) as again:  # a freed place is taken again
            again.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer, _ = read_until_closed(again)
        assert answer.startswith(b"HTTP/1.1 200")


def test_the_settings_reach_the_server() -> None:
    server = {
        "header_timeout": 3,
        "body_timeout": 4,
        "keep_alive_timeout": 7,
        "max_connections": 9,
    }
    options = _uvicorn_options(Settings(server=server))  # type: ignore[arg-type]
    assert options["timeout_keep_alive"] == 7
    protocol: Any = options["http"]
    assert protocol.keywords["limits"] == ConnectionLimits(3, 4, 9)


def test_defaults_are_safe() -> None:
    server = Settings().server
    assert (server.header_timeout, server.body_timeout) == (10, 30)
    assert server.keep_alive_timeout <= 30
    assert server.max_connections == 10_000


def test_an_unknown_uvicorn_is_refused_at_start_up() -> None:
    check_uvicorn("0.55.0")
    for version in ("0.60.0", "0.53.1", "1.0"):
        with pytest.raises(RuntimeError, match="UVICORN_RANGE"):
            check_uvicorn(version)


def test_a_body_trickle_to_the_gateway_is_cut_and_the_gateway_carries_on(
    upstream: MockUpstream,
) -> None:
    with running_gateway(config_for(upstream.url), http=protocol_factory(LIMITS)) as url:  # type: ignore[arg-type]
        port = int(url.removesuffix("/v1").rsplit(":", 1)[1])
        with connect(port) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            answer, _ = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert answer.count(b"HTTP/1.1") == 1  # the app's own answer is dropped
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/chat/completions", json=chat).status_code == 200


class _Transport:
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.sizes.pop(0)

    def abort(self) -> None:
        self.aborted = True


class _Loop:
    def __init__(self) -> None:
        self.armed = 0

    def call_later(self, delay: float, callback: Any) -> object:
        self.armed += 1
        return object()


def test_a_client_still_reading_is_given_more_time_one_that_stopped_is_cut() -> None:
    # A large answer to a slow but steady reader stays above the low-water mark for longer
    # than the write deadline: the deadline is time without progress, not time paused.
    stalled = SimpleNamespace(
        transport=_Transport([900_000, 500_000, 500_000]),
        loop=_Loop(),
        limits=ConnectionLimits(write_timeout=1),
        _stalled_at=1_000_000,
        _write_stall=None,
        _client_stalled=lambda: None,  # what the timer would call
    )
    SluiceHttpProtocol._client_stalled(stalled)  # type: ignore[arg-type]
    assert (stalled.loop.armed, stalled.transport.aborted) == (1, False)
    SluiceHttpProtocol._client_stalled(stalled)  # type: ignore[arg-type]
    assert (stalled.loop.armed, stalled.transport.aborted) == (2, False)
    SluiceHttpProtocol._client_stalled(stalled)  # type: ignore[arg-type]
    assert stalled.transport.aborted  # nothing read for a whole period
