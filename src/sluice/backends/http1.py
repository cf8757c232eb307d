"""A lean HTTP/1.1 client for OpenAI-compatible upstreams: keep-alive pool, streaming, timeouts.

Why not aiohttp: profiling the gateway at 32 concurrent requests on one core put aiohttp's
client (request/response objects, header merging, tracing hooks, cookie and redirect
machinery on every call) as the largest single cost of a proxied request
(docs/architecture.md). This
module does only what a gateway needs: POST a JSON body to a fixed origin over pooled
keep-alive connections (TLS included) and read the answer with httptools, the C parser
uvicorn already uses, either whole or chunk by chunk as it arrives.

Timeouts: ``connect`` bounds opening a connection; ``read`` bounds the wait for the response
headers and every gap between body chunks; ``total`` bounds the whole exchange (callers
apply it). Errors are raised as `sluice.errors` upstream errors whose messages name the
deployment, never the upstream's address or a library's exception text (those go to the
``sluice.upstream`` log).

Hostile or broken upstreams (docs/security.md, "Hostile upstreams"):

- 1xx interim responses (100 Continue, 103 Early Hints) are skipped; the final response
  is the one after them.
- A connection is reused only when its last response was complete, and it is never reused
  once a byte arrives that no request asked for (a late or extra response): such a
  connection is closed at once, so no later request can read an earlier one's answer.
- A request is never re-sent. An idle connection the server closed (EOF seen while idle)
  is skipped before anything is written; once the request is written, a connection that
  breaks before answering is a 502, because the upstream may have acted on the POST.
- A whole (non-streaming) body larger than ``max_body`` is a 502, read no further.

Through an HTTP proxy (`sluice.backends.proxy`): plain upstreams get absolute-form
requests on a kept-alive connection to the proxy; TLS upstreams a CONNECT tunnel with TLS
to the upstream over it, verified against the upstream's name.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from sluice.backends.proxy import Proxy, open_tunnel
from sluice.errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError

log = logging.getLogger("sluice.upstream")

DEFAULT_MAX_BODY = 32 * 1024 * 1024
_HIGH_WATER = 256 * 1024  # buffered body bytes before the socket stops being read
_NO_HEAD = "upstream: no response within the first-byte timeout"
_NO_DATA = "upstream: no data within the first-byte timeout"


def _expire(waiter: asyncio.Future[None], message: str) -> None:
    """A read timer ran out: fail the read it guards (called by the event loop)."""
    if not waiter.done():
        waiter.set_exception(UpstreamTimeoutError(message, code="upstream_read_timeout"))


class _Unsolicited(Exception):
    """A response began after the one this exchange asked for had completed."""


def too_large(name: str, limit: int) -> UpstreamError:
    return UpstreamError(
        f"upstream {name}: the response body is larger than the limit of {limit} bytes",
        code="upstream_response_too_large",
    )


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done: asyncio.Future[None] = loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.complete = False
        self.received = False
        self.error: Exception | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._until_close = False
        self._reusable = False
        self._interim = False

    # -- one exchange ----------------------------------------------------------------
    def begin(self, request: bytes) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done = self._loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self.complete = self.received = self._until_close = self._reusable = False
        self._interim = False
        self.error = None
        self.status, self.headers = 0, {}
        assert self.transport is not None
        self.transport.write(request)

    async def response_head(self, within: float) -> None:
        # Reads are timed by a timer on the loop that fails the awaited future, not by
        # asyncio.timeout(): on Python 3.11 that makes three get_running_loop() calls per
        # read, each a getpid() system call (six per request), plus a Python object.
        timer = self._loop.call_later(within, _expire, self._headers_done, _NO_HEAD)
        try:
            await self._headers_done
        finally:
            timer.cancel()

    async def next_chunk(self, within: float) -> bytes | None:
        """The next body bytes, or None once the body is complete."""
        while not self._chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(within, _expire, waiter, _NO_DATA)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def keep_alive(self) -> bool:
        return self.complete and not self.closed and self._reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.complete:  # bytes after a complete response: nobody asked for them
            self._unsolicited()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectError(f"upstream {self.name}: unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            if self.complete:  # raised by on_message_begin: a second response followed
                self._unsolicited()
                return
            log.warning("upstream %s sent a malformed HTTP response: %s", self.name, exc)
            self._fail(UpstreamConnectError(f"upstream {self.name}: malformed HTTP response"))

    def eof_received(self) -> None:
        # Marks an idle connection dead before anyone writes to it (the transport closes).
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and exc is None:
            self.on_message_complete()  # a body without length ends with the connection
        if self.complete:
            return
        if not self.received and self.reused:
            # Not re-sent: the request was written, and the upstream may have acted on it.
            self._fail(
                UpstreamConnectError(
                    f"upstream {self.name} closed a kept-alive connection before answering; "
                    "the request was not re-sent because it may have been processed",
                    code="upstream_reset",
                )
            )
        elif self._headers_done.done():
            self._fail(
                UpstreamConnectError(
                    f"upstream {self.name}: connection broke mid-response", code="upstream_reset"
                )
            )
        else:
            if exc is not None and self.transport is not None:
                log.warning("upstream %s: connection lost before a response: %r", self.name, exc)
            self._fail(
                UpstreamConnectError(f"upstream {self.name}: connection closed before a response")
            )

    def _unsolicited(self) -> None:
        if not self.closed:
            log.warning("upstream %s sent bytes nobody asked for; connection closed", self.name)
        self.close()

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            raise _Unsolicited  # stops the parser before it touches this exchange's state

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:
            self._interim_head()
            return
        chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
        self._until_close = not chunked and b"content-length" not in self.headers
        self._reusable = self._parser.should_keep_alive() and not self._until_close
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()

    def _interim_head(self) -> None:
        """A 1xx head: not the answer. Forget it and wait for the final response."""
        if self.status == 101:
            raise ValueError("101 Switching Protocols to a request that asked for no upgrade")
        self._interim = True
        self.status, self.headers = 0, {}

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.error = error
        if not self._headers_done.done():
            self._headers_done.set_exception(error)
            self._headers_done.exception()  # retrieved: no "never retrieved" warning
        self._wake()
        self.close()


@dataclass
class HTTP1Pool:
    """Pooled keep-alive connections to one origin (``scheme://host:port``)."""

    base_url: str
    max_connections: int
    connect_timeout: float
    read_timeout: float
    ca_file: str | None = None
    """PEM bundle to verify an https upstream against (default: the system's CAs)."""
    name: str = "unnamed"
    """The deployment's id: what error messages call the upstream."""
    max_body: int = DEFAULT_MAX_BODY
    """Bytes of a whole (non-streaming) response body before it is refused with a 502."""
    proxy: Proxy | None = None
    """An HTTP proxy to go through (CONNECT for https, absolute-form requests for http)."""
    _idle: deque[_Connection] = field(default_factory=deque)
    _slots: asyncio.Semaphore | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        self.host = parts.hostname or "localhost"
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.path_prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=self.ca_file) if tls else None
        default_port = (tls and self.port == 443) or (not tls and self.port == 80)
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        self.host_line = f"Host: {host_header}\r\n".encode()
        self._target = self.path_prefix
        if self.proxy is not None and not tls:
            # A plain request through a proxy names the whole URL and carries its credentials.
            self._target = f"http://{host_header}{self.path_prefix}"
            self.host_line += self.proxy.authorization or b""

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        return self._slots

    async def post(self, path: str, head: bytes, body: bytes, method: str = "POST") -> Reply:
        """POST (or ``method``) and read the whole answer. ``head`` holds the header lines
        after Host."""
        async with self.slots:
            conn = await self._exchange(path, head, body, method)
            try:
                parts = []
                size = 0
                while (chunk := await conn.next_chunk(self.read_timeout)) is not None:
                    size += len(chunk)
                    if size > self.max_body:
                        raise too_large(self.name, self.max_body)
                    parts.append(chunk)
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return Reply(conn.status, conn.headers, b"".join(parts))

    async def get(self, path: str, head: bytes) -> Reply:
        """GET and read the whole answer (a health probe's)."""
        return await self.post(path, head, b"", "GET")

    async def open_stream(
        self, path: str, head: bytes, body: bytes, deadline: float
    ) -> tuple[_Connection, AsyncIterator[bytes]]:
        """POST and return once the response head has arrived; iterate for the body, which
        ends with an `UpstreamTimeoutError` once the loop's clock passes ``deadline``.

        The caller must call `finish` with the connection when done, even on error.
        """
        await self.slots.acquire()
        try:
            conn = await self._exchange(path, head, body)
        except BaseException:
            self.slots.release()
            raise
        return conn, self._iterate(conn, deadline)

    def finish(self, conn: _Connection) -> None:
        """End a streamed exchange: a complete one returns its connection to the pool."""
        self._release(conn)
        self.slots.release()

    async def close(self) -> None:
        # Exchanges still running (a deployment retired by a reload) finish on their
        # connections; each is closed as it comes back instead of kept idle.
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def _iterate(self, conn: _Connection, deadline: float) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamTimeoutError(
                    "upstream: total timeout exceeded", code="upstream_timeout"
                )
            try:
                chunk = await conn.next_chunk(min(self.read_timeout, remaining))
            except UpstreamTimeoutError:
                if deadline - loop.time() <= 0:
                    raise UpstreamTimeoutError(
                        "upstream: total timeout exceeded", code="upstream_timeout"
                    ) from None
                raise
            if chunk is None:
                return
            yield chunk

    async def _exchange(
        self, path: str, head: bytes, body: bytes, method: str = "POST"
    ) -> _Connection:
        request = b"".join(
            (
                f"{method} {self._target}{path} HTTP/1.1\r\n".encode(),
                self.host_line,
                head,
                f"Content-Length: {len(body)}\r\n\r\n".encode(),
                body,
            )
        )
        conn = self._take_idle() or await self._connect()
        conn.begin(request)
        try:
            await conn.response_head(self.read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _take_idle(self) -> _Connection | None:
        # Closed here means known dead before anything is written: EOF or an unsolicited
        # byte arrived while idle. Skipping it is the only safe retry.
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._open(loop)
        except TimeoutError:
            log.warning("upstream %s: connect to %s timed out", self.name, self._where())
            raise UpstreamTimeoutError(
                f"upstream {self.name}: connect timed out", code="upstream_connect_timeout"
            ) from None
        except ssl.SSLError as exc:
            log.warning("upstream %s: TLS with %s failed: %s", self.name, self._where(), exc)
            raise UpstreamConnectError(
                f"upstream {self.name}: TLS handshake failed", code="upstream_tls_error"
            ) from exc
        except OSError as exc:
            log.warning("upstream %s: %s unreachable: %r", self.name, self._where(), exc)
            raise UpstreamConnectError(f"upstream {self.name} unreachable") from exc

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        proxy = self.proxy
        if proxy is None:
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self.name),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl else None,
            )
            return conn
        if self._ssl is None:
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self.name), proxy.host, proxy.port
            )
            return conn
        raw = await open_tunnel(loop, proxy, self.host, self.port, self.name)
        conn = _Connection(loop, self.name)
        try:
            tls = await loop.start_tls(raw, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        if tls is None:  # the transport closed during the handshake
            raise ConnectionResetError("connection closed during the TLS handshake")
        conn.connection_made(tls)
        return conn

    def _where(self) -> str:
        target = f"{self.host}:{self.port}"
        if self.proxy is not None:
            target += f" via proxy {self.proxy.host}:{self.proxy.port}"
        return target

    def _release(self, conn: _Connection) -> None:
        if conn.keep_alive and not self._closed:
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.close()
