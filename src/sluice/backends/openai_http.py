"""Backend for any OpenAI-compatible HTTP upstream, over one pooled keep-alive client.

One `HTTP1Pool` per deployment keeps connections alive and caps them at the deployment's
``max_concurrency`` (further requests wait for a free connection, bounded by the total
timeout). ``connect`` bounds opening a connection, ``first_byte`` the wait for the response
headers and every gap between stream chunks, ``total`` the whole exchange. Failures arrive
as `sluice.errors` upstream errors from the pool; the total timeout is mapped here.

What an upstream sends back is bounded here too (docs/security.md, "Hostile upstreams"):
Sluice asks for ``Accept-Encoding: identity``; a gzip or deflate body sent anyway is
decoded no further than ``max_response_bytes``, any other coding is refused with a 502,
and so is a compressed stream. An upstream 401 or 403 means the operator's credentials
were refused: the client gets a 502 ``upstream_auth_failed`` that quotes nothing of the
upstream's body (which can describe the key), and the body goes, redacted, to the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.embedding_batch import EmbeddingBatcher
from sluice.backends.http1 import HTTP1Pool, too_large
from sluice.backends.proxy import choose_proxy
from sluice.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    retry_after_seconds,
)
from sluice.observability.logging import scrub
from sluice.settings import OpenAIDeployment, resolve_url

log = logging.getLogger("sluice.upstream")

_ERROR_BODY_LIMIT = 1 << 20  # bytes of an upstream error body kept for relaying
_LOGGED_BODY = 500  # characters of a refused-credentials body written to the log
_KEYISH = re.compile(r"\b(?:sk|pk|rk|key)-[^\s\"',]+", re.IGNORECASE)


class OpenAIHTTPBackend:
    """Relays OpenAI-shaped requests to one upstream base URL."""

    def __init__(self, name: str, settings: OpenAIDeployment, api_key: str | None) -> None:
        self.name = name
        self._settings = settings
        self._api_key = api_key
        lines = [
            b"Content-Type: application/json",
            b"Accept: application/json",
            b"Accept-Encoding: identity",
        ]
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
        settings = self._settings
        self._pool = HTTP1Pool(
            settings.api_base,
            max_connections=settings.max_concurrency,
            connect_timeout=settings.timeout.connect,
            read_timeout=settings.timeout.first_byte,
            ca_file=settings.ca_file,
            name=self.name,
            max_body=settings.max_response_bytes,
            proxy=choose_proxy(settings.api_base, resolve_url(settings.proxy)),
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
        body = reply.body
        encoding = reply.headers.get(b"content-encoding")
        if encoding is not None:
            body = _decoded(self.name, body, encoding, self._settings.max_response_bytes)
        content_type = reply.headers.get(b"content-type", b"application/json").decode("latin-1")
        if reply.status >= 400:
            raise self._status_error(reply.status, body, content_type, reply.headers)
        return UpstreamReply(reply.status, body, content_type)

    async def probe(self) -> bool:
        """An active health probe: whether ``GET /models`` answers without a server error
        (transport failures raise `UpstreamError`)."""
        reply = await self._require_pool().get("/models", self._head)
        return reply.status < 500

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
                parts: list[bytes] = []
                size = 0
                async for chunk in chunks:
                    parts.append(chunk)
                    size += len(chunk)
                    if size > _ERROR_BODY_LIMIT:
                        break
                body = b"".join(parts)
                encoding = conn.headers.get(b"content-encoding")
                if encoding is not None:
                    body = _decoded(self.name, body, encoding, _ERROR_BODY_LIMIT)
                content_type = conn.headers.get(b"content-type", b"").decode("latin-1")
                raise self._status_error(conn.status, body, content_type, conn.headers)
            if conn.headers.get(b"content-encoding", b"identity").lower() != b"identity":
                raise _bad_encoding(self.name, conn.headers[b"content-encoding"], "a stream")
            yield chunks
        finally:
            pool.finish(conn)  # incomplete: the connection is dropped, aborting the upstream

    def _status_error(
        self, status: int, body: bytes, content_type: str, headers: dict[bytes, bytes]
    ) -> UpstreamError:
        if status not in (401, 403):
            return UpstreamStatusError(
                status, body, content_type, _retry_after(headers), should_retry(headers)
            )
        text = scrub(body[: _LOGGED_BODY * 2].decode("utf-8", "replace"))
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        log.warning(
            "upstream %s refused the gateway's credentials (HTTP %d): %s",
            self.name,
            status,
            _KEYISH.sub("[redacted]", text)[:_LOGGED_BODY],
        )
        return UpstreamAuthError(
            f"upstream {self.name} refused the gateway's credentials "
            f"(HTTP {status}); the operator should check this deployment's api_key"
        )

    def _request_head(self, call: UpstreamCall) -> bytes:
        head = self._head + b"X-Request-ID: " + call.request_id.encode() + b"\r\n"
        for name, value in call.headers.items():
            head += f"{name}: {value}\r\n".encode()
        return head

    def _require_pool(self) -> HTTP1Pool:
        if self._pool is None:
            raise UpstreamConnectError(f"deployment {self.name} is not started")
        return self._pool


def _retry_after(headers: dict[bytes, bytes]) -> float | None:
    """The wait an error answer asks for: ``retry-after-ms`` (OpenAI, Azure) when readable,
    else ``Retry-After`` (seconds or an HTTP-date); bounded (`retry_after_seconds`)."""
    seconds = retry_after_seconds(headers.get(b"retry-after-ms"), millis=True)
    if seconds is not None:
        return seconds
    return retry_after_seconds(headers.get(b"retry-after"))


def should_retry(headers: dict[bytes, bytes]) -> bool | None:
    """OpenAI's ``x-should-retry`` hint (``true`` / ``false``); None when absent or neither."""
    value = headers.get(b"x-should-retry", b"").strip().lower()
    return True if value == b"true" else False if value == b"false" else None


def _payload(call: UpstreamCall) -> bytes:
    return call.raw if call.raw is not None else orjson.dumps(call.body)


def _total_timeout(name: str) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"upstream {name}: total timeout exceeded", code="upstream_timeout")


_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def _decoded(name: str, body: bytes, encoding: bytes, limit: int) -> bytes:
    """Sluice asks for no compression; undo gzip or deflate if an upstream compresses anyway,
    producing at most ``limit`` bytes (a small bomb must not become a huge body)."""
    coding = encoding.strip().lower()
    if coding in (b"", b"identity"):
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise _bad_encoding(name, encoding, "a response")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        log.warning("upstream %s sent a corrupt %s body: %s", name, coding.decode(), exc)
        raise _corrupt(name) from None
    if len(out) > limit:
        raise too_large(name, limit)
    if not inflater.eof:
        log.warning("upstream %s sent a truncated %s body", name, coding.decode())
        raise _corrupt(name)
    return out


def _corrupt(name: str) -> UpstreamError:
    return UpstreamError(
        f"upstream {name} sent a corrupt compressed body", code="upstream_bad_encoding"
    )


def _bad_encoding(name: str, encoding: bytes, what: str) -> UpstreamError:
    log.warning("upstream %s sent %s with Content-Encoding %r", name, what, encoding[:100])
    return UpstreamError(
        f"upstream {name} sent {what} in a Content-Encoding the gateway did not ask for",
        code="upstream_bad_encoding",
    )
