"""A lean, pipelined Redis client for the rate limiter's two scripts.

Why not redis-py here: with redis-py's asyncio client each limiter call cost about 85 us of
CPU (connection-pool checkout, command packing, retry wrappers, response callbacks), which
made Redis-backed limits cut the gateway's throughput several-fold. The limiter needs only
EVALSHA on one server, so this client keeps ONE connection per process and pipelines every
call on it: a call queues its command and awaits a future; the commands queued during one
turn of the event loop leave in one write, and replies, parsed by hiredis, arrive in order
and resolve the futures in order. Concurrent requests thereby share round trips and system
calls.

Errors are redis-py's exception classes (``ConnectionError``, ``TimeoutError``,
``ResponseError``), so callers handle both clients alike. Timeouts cost no timer per call: a
watchdog looks at the oldest unanswered call every half timeout, and when it is overdue the
connection is judged stuck: every waiting call fails with ``TimeoutError`` and the
connection is closed (replies are ordered, so nothing behind a stuck reply can arrive). A
lost connection fails every waiting call and is reopened by the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _command(*parts: bytes | str | int) -> bytes:
    """One command in RESP, packed by hiredis in C (a third of the Python loop's CPU)."""
    return cast(bytes, hiredis.pack_command(cast(Any, parts)))


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
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outbox: list[bytes] = []  # commands written during this loop iteration
        self.lost = False

    def send(self, command: bytes) -> None:
        """Queue ``command``; every command queued in one loop iteration goes out in one
        write (one system call) when the loop next runs its callbacks."""
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outbox.append(command)

    def flush(self) -> None:
        out, self.outbox = self.outbox, []
        if out and self.transport is not None and not self.lost:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, _ = self.waiting.popleft()
            if future.done():
                continue  # its caller went away; the reply is dropped
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_all(RedisConnectionError(f"Redis connection lost ({exc})"))

    def fail_all(self, error: Exception) -> None:
        self.lost = True
        self.outbox.clear()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
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
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connection()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append((future, loop.time() + self._timeout))
        protocol.send(command)
        return await future

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
            future, deadline = protocol.waiting[0]
            if not future.done() and loop.time() > deadline:
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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append((future, loop.time() + self._timeout))
        assert protocol.transport is not None
        protocol.transport.write(_command(*parts))
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
        ``sprintf`` each, ~11k instructions a request), where the limiter's keys and limits
        are the same for every request of a key."""
        tail = bulk(b"%d" % keys) + body
        size = b"*%d\r\n" % (items + 3)
        try:
            return await self._client.execute_packed(size + self._evalsha + tail)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._client.execute_packed(size + self._eval + tail)
