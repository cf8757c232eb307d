"""Sluice's HTTP/1.1 protocol for uvicorn: httptools' own, plus one ASGI server extension.

The extension, ``sluice.header_block`` (advertised in ``scope["extensions"]``), lets the
app hand the server ready-made header lines in the ``http.response.start`` message, under
the same key, as bytes (``b"name: value\\r\\n"`` per header). The server writes them as
they are after the ordinary headers. Sluice's request middleware uses it for the
``x-ratelimit-*`` headers of a limited key: six names of its own and numbers it formats
itself, so nothing in them needs checking, where uvicorn checks every ordinary header
with two regular expressions and lower-cases its name (what that costs: the "Figures"
section of docs/architecture.md). Only Sluice's own code may put a block in a message:
the server does not check it.

Without the extension (another server, an in-process ASGI client) the middleware sends
ordinary headers; ``scope["extensions"]`` tells it which. Everything else is uvicorn's
httptools protocol, unchanged: ``on_headers_complete`` and ``_Cycle.send`` are uvicorn
0.54's, the first making a ``_Cycle``, the second writing the block in, and
``tests/api/test_http_protocol.py`` checks that both write the same bytes for the same
messages (run it after upgrading uvicorn; see the version check below).

It also guards the connection against slow and numerous clients, which uvicorn does not
(``ConnectionLimits``, from ``server.*`` settings; docs/security/edge.md):

- **Headers deadline.** From connect, or from the end of the first chunk of a later
  request on a kept-alive connection, the request line and headers must arrive within
  ``header_timeout``; otherwise 408 (if any byte came) and the connection is closed.
- **Body deadline.** From the headers to the body's last byte, ``body_timeout``; then 408
  if the app has not answered yet (the app's reading sees the client leave), else close.
- **Connection cap.** Past ``max_connections`` open connections a new one gets a canned
  503 and is closed at once, before anything is parsed.

Timers are armed only when a read leaves a request unfinished (after the parser returns),
so a request that arrives in one piece, the usual case, arms none. Idle kept-alive
connections stay under uvicorn's own ``timeout_keep_alive``.

This module is Sluice's one reach into uvicorn: it subclasses uvicorn's httptools protocol
and request cycle, imports their helpers (``STATUS_LINE``, the header checks, the 503 app,
the access log's formatting), copies two methods and reads the protocol's state (its
connections, cycle, transport and flow control) from the deadlines. `protocol_factory`,
the only way the server builds it, first checks that the installed uvicorn is in
``UVICORN_RANGE`` (`sluice.versions`; pyproject.toml pins the same range) and otherwise
refuses to start, naming the range. It does not fall back to uvicorn's own protocol
(``http="httptools"``): that would drop not only the header block (a speed-up; the
middleware would send ordinary headers) but the deadlines and the connection cap, which
are defences (docs/security/edge.md), and a server that quietly stops defending itself
after an upgrade is worse than one that says it will not start.
tests/api/test_http_protocol.py and tests/security/test_slow_clients.py are the checks to
run before widening the range.
"""

from __future__ import annotations

import asyncio
import functools
import urllib.parse
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from sluice.versions import Covered

HEADER_BLOCK = "sluice.header_block"
"""The extension's name: in ``scope["extensions"]`` and as the start message's key."""

_EXTENSIONS: MappingProxyType[str, MappingProxyType[str, object]] = MappingProxyType(
    {HEADER_BLOCK: MappingProxyType({})}
)


def header_pairs(block: bytes, out: list[tuple[bytes, bytes]]) -> None:
    """Append the header lines of a ``HEADER_BLOCK`` to ``out`` as ASGI header pairs, for
    servers without the extension (the block's lines are the one source of both)."""
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            out.append((name, value))


UVICORN_RANGE = Covered("uvicorn", (0, 54), (0, 60))
"""uvicorn releases whose httptools protocol this module was written and tested for."""

_IDLE, _HEADERS, _BODY = 0, 1, 2


def _canned(status: int, message: str, type_: str, code: str) -> bytes:
    """A whole error response, made once at import, for answers written before (or
    instead of) the app."""
    body = (
        f'{{"error":{{"message":"{message}","type":"{type_}","param":null,"code":"{code}"}}}}'
    ).encode()
    head = STATUS_LINE[status] + b"content-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


_REFUSED = _canned(
    503,
    "Too many open connections; retry later.",
    "service_unavailable",
    "too_many_connections",
)
_TIMED_OUT = _canned(
    408, "The request did not arrive in time.", "invalid_request_error", "request_timeout"
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Deadlines and the connection cap (``server.header_timeout`` and so on)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    write_timeout: float = 60.0


DEFAULT_LIMITS = ConnectionLimits()


def check_uvicorn(version: str | None = None) -> None:
    """Refuse to start on a uvicorn this module was not written for (see the module)."""
    installed = version or uvicorn.__version__
    if not UVICORN_RANGE.covers(installed):
        raise RuntimeError(
            f"sluice.http_protocol was written for {UVICORN_RANGE}; uvicorn {installed} is "
            "installed. Install a uvicorn in that range, or check the protocol against this "
            "one (tests/api/test_http_protocol.py, tests/security/test_slow_clients.py) and "
            "widen UVICORN_RANGE and pyproject.toml's pin together."
        )


def protocol_factory(limits: ConnectionLimits) -> Callable[..., SluiceHttpProtocol]:
    """What to pass as ``uvicorn.Config(http=...)``: the protocol with these limits (a
    partial, so it pickles into worker processes)."""
    check_uvicorn()
    return functools.partial(SluiceHttpProtocol, limits=limits)


class SluiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests support ``sluice.header_block``
    and whose connections have deadlines and a cap (pass `protocol_factory`'s result,
    or the class for the default limits, as ``uvicorn.Config(http=...)``)."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._phase = _IDLE
        self._deadline: TimerHandle | None = None
        self._write_stall: TimerHandle | None = None
        self._stalled_at = 0  # bytes waiting to be written when the stall was last looked at

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Refused before it is counted or read: one write, one close.
            self.transport = transport
            transport.write(_REFUSED)
            transport.close()
            return
        super().connection_made(transport)
        # A connection that never sends a byte is cut at the headers deadline too.
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client stopped reading: a stream would otherwise wait for it for ever,
        # holding its upstream call, its slot and its budget hold, its usage unrecorded.
        super().pause_writing()
        if self._write_stall is None:
            self._stalled_at = self.transport.get_write_buffer_size()
            self._write_stall = self.loop.call_later(
                self.limits.write_timeout, self._client_stalled
            )

    def resume_writing(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        super().resume_writing()

    def _client_stalled(self) -> None:
        # A client still reading (the buffer shrank since the last look, though not yet
        # below the low-water mark: a large answer to a slow link) gets another period.
        # One that read nothing is cut: abort(), as close() would wait to flush what the
        # client won't read.
        waiting = self.transport.get_write_buffer_size()
        if waiting < self._stalled_at:
            self._stalled_at = waiting
            self._write_stall = self.loop.call_later(
                self.limits.write_timeout, self._client_stalled
            )
            return
        self._write_stall = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase and self._deadline is None and not self.transport.is_closing():
            if self._phase == _HEADERS:
                self._deadline = self.loop.call_later(
                    self.limits.header_timeout, self._headers_late
                )
            else:
                self._deadline = self.loop.call_later(self.limits.body_timeout, self._body_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEADERS

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._cancel_deadline()
        super().on_message_complete()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined request is slow behind one still being answered: finish that
            # answer, then close.
            cycle.keep_alive = False
            return
        if self._phase == _HEADERS:
            self.transport.write(_TIMED_OUT)
        self.transport.close()

    def _body_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(_TIMED_OUT)
            # The app's receive() now reports the client gone and its send() is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._cancel_deadline()
        # uvicorn's, but for the extension in the scope (read-only, shared by every
        # request) and a _Cycle instead of a RequestResponseCycle. (Switching the class of
        # uvicorn's own cycle afterwards cost more than the extension saves: the instance's
        # attributes then missed the interpreter's specialised look-ups.)
        http_version = self.parser.get_http_version()
        method = self.parser.get_method()
        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        full_path = self.root_path + path
        full_raw_path = self.root_path.encode("ascii") + raw_path
        self.scope["path"] = full_path
        self.scope["raw_path"] = full_raw_path
        self.scope["query_string"] = parsed_url.query or b""
        self.scope["extensions"] = _EXTENSIONS  # type: ignore[typeddict-item]

        # Handle 503 responses when 'limit_concurrency' is exceeded.
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            message = "Exceeded concurrency limit."
            self.logger.warning(message)
        else:
            app = self.app

        existing_cycle = self.cycle
        self.cycle = _Cycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing_cycle is None or existing_cycle.response_complete:
            # Standard case - start processing the request.
            self._start_asgi_task(self.cycle, app)
        else:
            # Pipelined HTTP requests need to be queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))


class _Cycle(RequestResponseCycle):
    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()

        if self.disconnected:
            return

        if not self.response_started:
            # Sending response status line and headers
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )

            self.response_started = True
            self.waiting_for_100_continue = False

            status_code = message["status"]
            headers = self.default_headers + list(message.get("headers", []))

            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status_code,
                )

            # Write response status line and headers
            content = [STATUS_LINE[status_code]]
            has_connection_close = False

            for name, value in headers:
                if HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")

                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    connection = [token.lower().strip() for token in value.split(b",")]
                    if b"close" in connection:
                        self.keep_alive = False
                        has_connection_close = True
                content.extend([name, b": ", value, b"\r\n"])

            block = message.get(HEADER_BLOCK)
            if block:  # Sluice's own header lines, written as they are
                content.append(block)

            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")

            if (
                self.chunked_encoding is None
                and self.scope["method"] != "HEAD"
                and status_code not in (204, 304)
            ):
                # Neither content-length nor transfer-encoding specified
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")

            content.append(b"\r\n")
            self.transport.write(b"".join(content))

        elif not self.response_complete:
            # Sending response body
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )

            body = message.get("body", b"")
            more_body = message.get("more_body", False)

            # Write response body
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                chunk = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
                if not more_body:
                    chunk.append(b"0\r\n\r\n")
                self.transport.write(b"".join(chunk))
            else:
                num_bytes = len(body)
                if num_bytes > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                else:
                    self.expected_content_length -= num_bytes
                self.transport.write(body)

            # Handle response completion
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()

        else:
            # Response already sent
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, "
                "after response already completed."
            )
