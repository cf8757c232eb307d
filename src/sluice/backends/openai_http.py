"""Backend for any OpenAI-compatible HTTP upstream, over one pooled aiohttp session.

One `aiohttp.ClientSession` per deployment keeps connections alive and caps them at the
deployment's ``max_concurrency`` (further requests wait for a free connection, bounded by
the total timeout). Timeouts map onto aiohttp's: ``connect`` → socket connect,
``first_byte`` → socket read (headers, then the gap between stream chunks), ``total`` →
the whole exchange. aiohttp's exceptions are translated into `sluice.errors` here, at the
boundary, so nothing above this module sees them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
import orjson

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.embedding_batch import EmbeddingBatcher
from sluice.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from sluice.settings import OpenAIDeployment


class OpenAIHTTPBackend:
    """Relays OpenAI-shaped requests to one upstream base URL."""

    def __init__(self, name: str, settings: OpenAIDeployment, api_key: str | None) -> None:
        self.name = name
        self._settings = settings
        self._base = settings.api_base
        self._headers = {"Content-Type": "application/json", **settings.headers}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self.embedding_batcher = (
            EmbeddingBatcher(self._post, settings.batch_embeddings)
            if settings.batch_embeddings is not None
            else None
        )

    async def start(self) -> None:
        timeout = self._settings.timeout
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_concurrency,
            limit_per_host=0,
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.first_byte
            ),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.embedding_batcher is not None:
            await self.embedding_batcher.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if call.route == "embeddings" and self.embedding_batcher is not None:
            return await self.embedding_batcher.send(call)
        return await self._post(call)

    async def _post(self, call: UpstreamCall) -> UpstreamReply:
        session = self._require_session()
        with self._translate_errors():
            async with session.post(
                f"{self._base}/{call.route}",
                data=_payload(call),
                headers=self._request_headers(call),
            ) as response:
                body = await response.read()
                content_type = response.headers.get("Content-Type", "application/json")
        if response.status >= 400:
            raise UpstreamStatusError(response.status, body, content_type)
        return UpstreamReply(response.status, body, content_type)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        session = self._require_session()
        with self._translate_errors():
            response = await session.post(
                f"{self._base}/{call.route}",
                data=_payload(call),
                headers=self._request_headers(call),
            )
        try:
            if response.status >= 400:
                with self._translate_errors():
                    body = await response.read()
                raise UpstreamStatusError(
                    response.status, body, response.headers.get("Content-Type", "")
                )
            yield self._chunks(response)
        finally:
            if response.content.at_eof():
                response.release()  # fully read: the connection goes back to the pool
            else:
                response.close()  # abandoned mid-stream: drop the connection, abort upstream

    async def _chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        with self._translate_errors():
            async for chunk in response.content.iter_any():
                yield chunk

    def _request_headers(self, call: UpstreamCall) -> dict[str, str]:
        headers = {**self._headers, "X-Request-ID": call.request_id}
        if call.headers:
            headers.update(call.headers)
        return headers

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise UpstreamConnectError(f"deployment {self.name} is not started")
        return self._session

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except UpstreamError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeoutError(
                f"upstream {self.name}: connect timed out", code="upstream_connect_timeout"
            ) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise UpstreamTimeoutError(
                f"upstream {self.name}: no data within the first-byte timeout",
                code="upstream_read_timeout",
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"upstream {self.name}: total timeout exceeded", code="upstream_timeout"
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamConnectError(
                f"upstream {self.name}: connection broke mid-response", code="upstream_reset"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(
                f"upstream {self.name}: unreachable ({type(exc).__name__})"
            ) from exc


def _payload(call: UpstreamCall) -> bytes:
    return call.raw if call.raw is not None else orjson.dumps(call.body)
