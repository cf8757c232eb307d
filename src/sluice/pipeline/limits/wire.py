"""A lean, pipelined Redis client for the rate limiter's script.

Why not redis-py here: with redis-py's asyncio client most of a limiter call's CPU went
around the command (connection-pool checkout, command packing, retry wrappers, response
callbacks; figures in docs/architecture.md), which made Redis-backed limits cut the
gateway's throughput several-fold. The limiter needs only
EVALSHA on one server, so this client keeps ONE connection per process and pipelines every
call on it: a call writes its command at once and leaves a *sink*, the callable its reply
(or error) is handed to; replies, parsed by hiredis, arrive in order and go to their sinks
in order. (The limiter batches its calls itself: one script call per event-loop turn.)
``execute`` is the awaitable form (its sink resolves a future); the rate limiter uses
``Script.send``, which needs no task, coroutine or future of its own per call (a task,
three coroutines and two futures less per script call than the awaitable path).

Errors are redis-py's exception classes (``ConnectionError``, ``TimeoutError``,
``ResponseError``), so callers handle both clients alike; a sink is handed the exception
instance. Timeouts cost no timer per call: a watchdog looks at the oldest unanswered call
every half timeout, and when it is overdue the connection is judged stuck: every waiting
call fails with ``TimeoutError`` and the connection is closed (replies are ordered, so
nothing behind a stuck reply can arrive). A lost connection fails every waiting call and is
reopened by the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _command(*parts: bytes | str | int) -> bytes:
    """One command in RESP, packed by hiredis in C (a third of the Python loop's CPU)."""
    return cast(bytes, hiredis.pack_command(cast(Any, parts)))


Sink = Callable[[Any], None]
"""Where a reply goes: called once with the reply, or with the exception that stands for it
(``ResponseError`` for an error reply, ``ConnectionError``/``TimeoutError`` for a lost or
stuck connection). It runs inside the protocol's callbacks: it must not raise."""


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    """The sink of an awaited call."""
    if future.done():
        return  # its caller went away; the reply is dropped
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def bulk(value: bytes) -> bytes:
    """``value`` as one RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulks(*values: bytes | str | int) -> bytes:
    """Arguments as RESP bulk strings, for `Script.run_packed`: a caller encodes the
    arguments it sends again and again once (str as UTF-8, int in decimal)."""
    return b"".join(
        bulk(v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else b"%d" % v)
        for v in values
    )


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[tuple[Sink, float]] = deque()  # (sink, deadline), in send order
        self.lost = False

    def call(self, command: bytes, sink: Sink, timeout: float) -> None:
        """Write ``command`` now; its reply goes to ``sink``, due within ``timeout``."""
        self.waiting.append((sink, asyncio.get_running_loop().time() + timeout))
        assert self.transport is not None  # set when the connection was made
        self.transport.write(command)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting, gets = self.waiting, self.reader.gets
        while (reply := gets()) is not False:
            waiting.popleft()[0](reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_all(RedisConnectionError(f"Redis connection lost ({exc})"))

    def fail_all(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            self.waiting.popleft()[0](error)
        if self.transport is not None:
            self.transport.close()


class PipelinedRedis:
    """``redis://[:password@]host[:port][/db]`` or ``rediss://…`` (TLS)."""

    def __init__(self, url: str, *, timeout: float = 0.5) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        self._db = int(parts.path.lstrip("/") or 0)
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def register_script(self, script: str) -> Script:
        return Script(self, script)

    async def execute(self, *parts: bytes | str | int) -> Any:
        return await self.execute_packed(_command(*parts))

    async def execute_packed(self, command: bytes) -> Any:
        """Send one command already in RESP (an array of bulk strings); its reply."""
        return await self.awaited(partial(self.send, command))

    async def awaited(self, send: Callable[[Sink], bool]) -> Any:
        """The reply of what ``send(sink)`` queues (`send`, `Script.send`), awaited; the
        connection is opened first when ``send`` finds none."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sink = partial(_resolve, future)
        if not send(sink):
            await self.connect()
            if not send(sink):
                raise RedisConnectionError("Redis connection lost as it opened")
        return await future

    def send(self, command: bytes, sink: Sink) -> bool:
        """Send one command already in RESP; its reply goes to ``sink``. False (and nothing
        sent) while no connection is open: `connect` first."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return False
        protocol.call(command, sink, self._timeout)
        return True

    async def connect(self) -> None:
        """Open the connection unless it is open (raises ``ConnectionError``)."""
        await self._connection()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._timeout / 2)
            protocol = self._protocol
            if protocol is None or not protocol.waiting:
                continue
            # Overdue, whether or not its caller still waits: replies are ordered, so nothing
            # behind it can arrive before it does.
            if loop.time() > protocol.waiting[0][1]:
                protocol.fail_all(
                    RedisTimeoutError(f"Redis did not answer within {self._timeout} s")
                )

    async def _connection(self) -> _Protocol:
        if self._protocol is not None and not self._protocol.lost:
            return self._protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is None or self._protocol.lost:
                self._protocol = await self._open()
            if self._watchdog is None:
                self._watchdog = asyncio.create_task(self._watch(), name="redis-watchdog")
        return self._protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await loop.create_connection(
                    _Protocol, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )  # fmt: skip
        except (OSError, TimeoutError) as exc:  # the builtin TimeoutError of asyncio.timeout
            raise RedisConnectionError(
                f"cannot reach Redis at {self._host}:{self._port}: {exc}"
            ) from exc
        # Published (by _connection) only after the handshake: a command queued meanwhile
        # would be written after the handshake's and get its reply.
        try:
            if self._password is not None:
                credentials = (
                    [self._username, self._password] if self._username else [self._password]
                )
                await self._handshake(protocol, "AUTH", *credentials)
            if self._db:
                await self._handshake(protocol, "SELECT", self._db)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.close()
            raise
        return protocol

    async def _handshake(self, protocol: _Protocol, *parts: str | int) -> None:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.call(_command(*parts), partial(_resolve, future), self._timeout)
        async with asyncio.timeout(self._timeout):
            await future


class Script:
    """A Lua script run by SHA, loaded again when the server answers NOSCRIPT (a restart)."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._evalsha = bulks("EVALSHA", self._sha)
        self._eval = bulks("EVAL", source)

    async def __call__(
        self, keys: Sequence[str] = (), args: Sequence[bytes | str | int] = ()
    ) -> Any:
        return await self.run_packed(len(keys), len(keys) + len(args), bulks(*keys, *args))

    async def run_packed(self, keys: int, items: int, body: bytes) -> Any:
        """Run the script over arguments already in RESP: ``body`` is ``items`` bulk strings
        (`bulk`, `bulks`), the first ``keys`` of them the keys. The rate limiter's way:
        hiredis's ``pack_command`` formats every argument of every call again (a
        ``sprintf`` each), where the limiter's keys and limits are the same for every
        request of a key."""
        return await self._client.awaited(partial(self.send, keys, items, body))

    def send(self, keys: int, items: int, body: bytes, sink: Sink) -> bool:
        """`run_packed` without awaiting: the reply goes to ``sink``. False (nothing sent)
        while the client has no open connection (`PipelinedRedis.connect`)."""
        tail = bulk(b"%d" % keys) + body
        size = b"*%d\r\n" % (items + 3)
        return self._client.send(
            size + self._evalsha + tail, partial(self._after_evalsha, size, tail, sink)
        )

    def _after_evalsha(self, size: bytes, tail: bytes, sink: Sink, reply: Any) -> None:
        """NOSCRIPT (Redis restarted or flushed its scripts): send the source, same sink."""
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            if self._client.send(size + self._eval + tail, sink):
                return
            reply = RedisConnectionError("Redis connection lost")
        sink(reply)
