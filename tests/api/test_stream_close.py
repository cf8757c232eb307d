"""The HTTP side of a streamed answer: the upstream (and the deployment's concurrency slot,
which the stream's close gives back) is closed when the response ends, however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect

from sluice.api.openai import OpenAIService
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.reply import StreamReply


class Stream:
    def __init__(self) -> None:
        self.closed = 0

    async def events(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"data: {}\n\n"

    async def close(self) -> None:
        self.closed += 1


def _service(stream: Stream) -> OpenAIService:
    async def pipeline(ctx: RequestContext) -> StreamReply:
        ctx.model = "m"
        return StreamReply(stream.events(), stream.close)

    return OpenAIService(pipeline, list, GatewayMetrics(CollectorRegistry()))


def _scope(spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "headers": [],
        "query_string": b"",
        "client": ("127.0.0.1", 1),
        SCOPE_KEY: RequestContext(request_id="r", started=0.0),
    }


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_client_gone_mid_stream_closes_the_upstream_at_once() -> None:
    # An ASGI 2.4 server reports the departure as an OSError from send; the response then
    # skips its background task, so the close must not depend on it.
    stream = Stream()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")

    scope = _scope("2.4")
    with pytest.raises(ClientDisconnect):
        await _service(stream).chat_completions(scope, _never_disconnects, send)
    assert stream.closed >= 1
    assert scope[SCOPE_KEY].client_disconnected


async def test_a_finished_stream_is_closed() -> None:
    stream = Stream()

    async def send(message: dict[str, Any]) -> None:
        pass

    await _service(stream).chat_completions(_scope("2.3"), _never_disconnects, send)
    assert stream.closed >= 1
