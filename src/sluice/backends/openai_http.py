"""Backend for any OpenAI-compatible HTTP upstream, over one pooled keep-alive client.

One `HTTP1Pool` per deployment keeps connections alive and caps them at the deployment's
``max_concurrency`` (further requests wait for a free connection, bounded by the total
timeout). ``connect`` bounds opening a connection, ``first_byte`` the wait for the response
headers and every gap between stream chunks, ``total`` the whole exchange. Failures arrive
as `sluice.errors` upstream errors from the pool; the total timeout is mapped here.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.embedding_batch import EmbeddingBatcher
from sluice.backends.http1 import HTTP1Pool
from sluice.errors import UpstreamConnectError, UpstreamStatusError, UpstreamTimeoutError
from sluice.settings import OpenAIDeployment

_ERROR_BODY_LIMIT = 1 << 20  # bytes of an upstream error body kept for relaying


class OpenAIHTTPBackend:
    """Relays OpenAI-shaped requests to one upstream base URL."""

    def __init__(self, name: str, settings: OpenAIDeployment, api_key: str | None) -> None:
        self.name = name
        self._settings = settings
        lines = [b"Content-Type: application/json", b"Accept: application/json"]
        if api_key:
            lines.append(b"Authorization: Bearer " + api_key.encode())
        lines += [f"{k}: {v}".encode() for k, v in settings.headers.items()]
        self._head = b"".join(line + b"\r\n" for line in lines)
        self._pool: HTTP1Pool | None = None
        self.embedding_batcher = (
            EmbeddingBatcher(self._post, settings.batch_embeddings)
            if settings.batch_embeddings is not None
            else None
        )

    async def start(self) -> None:
        timeout = self._settings.timeout
        self._pool = HTTP1Pool(
            self._settings.api_base,
            max_connections=self._settings.max_concurrency,
            connect_timeout=timeout.connect,
            read_timeout=timeout.first_byte,
            ca_file=self._settings.ca_file,
        )

    async def close(self) -> None:
        if self.embedding_batcher is not None:
            await self.embedding_batcher.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if call.route == "embeddings" and self.embedding_batcher is not None:
            return await self.embedding_batcher.send(call)
        return await self._post(call)

    async def _post(self, call: UpstreamCall) -> UpstreamReply:
        pool = self._require_pool()
        try:
            async with asyncio.timeout(self._settings.timeout.total):
                reply = await pool.post(f"/{call.route}", self._request_head(call), _payload(call))
        except TimeoutError:
            raise _total_timeout(self.name) from None
        body = _decoded(reply.body, reply.headers.get(b"content-encoding"))
        content_type = reply.headers.get(b"content-type", b"application/json").decode("latin-1")
        if reply.status >= 400:
            raise UpstreamStatusError(reply.status, body, content_type)
        return UpstreamReply(reply.status, body, content_type)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        pool = self._require_pool()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.timeout.total
        try:
            async with asyncio.timeout_at(deadline):
                conn, chunks = await pool.open_stream(
                    f"/{call.route}", self._request_head(call), _payload(call), deadline
                )
        except TimeoutError:
            raise _total_timeout(self.name) from None
        try:
            if conn.status >= 400:
                body = b""
                async for chunk in chunks:
                    body += chunk
                    if len(body) > _ERROR_BODY_LIMIT:
                        break
                content_type = conn.headers.get(b"content-type", b"").decode("latin-1")
                raise UpstreamStatusError(conn.status, body, content_type)
            yield chunks
        finally:
            pool.finish(conn)  # incomplete: the connection is dropped, aborting the upstream

    def _request_head(self, call: UpstreamCall) -> bytes:
        head = self._head + b"X-Request-ID: " + call.request_id.encode() + b"\r\n"
        for name, value in call.headers.items():
            head += f"{name}: {value}\r\n".encode()
        return head

    def _require_pool(self) -> HTTP1Pool:
        if self._pool is None:
            raise UpstreamConnectError(f"deployment {self.name} is not started")
        return self._pool


def _payload(call: UpstreamCall) -> bytes:
    return call.raw if call.raw is not None else orjson.dumps(call.body)


def _total_timeout(name: str) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"upstream {name}: total timeout exceeded", code="upstream_timeout")


def _decoded(body: bytes, encoding: bytes | None) -> bytes:
    """Sluice asks for no compression; undo it if an upstream compresses anyway."""
    if encoding in (b"gzip", b"x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        return zlib.decompress(body)
    return body
