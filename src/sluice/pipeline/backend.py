"""The last step: one call to the deployment the attempt chose (``ctx.target``).

A complete answer comes back as the upstream's bytes (the attempts step reads its usage);
a stream comes back open, once its first event has arrived, with its events framed and
its usage read as they pass (`sluice.pipeline.sse`). For a complete answer this returns the
backend's own coroutine, adding none of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack

from sluice.backends.base import Backend, UpstreamCall
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.sse import relay_events
from sluice.pipeline.steps import Reply


def call_backend(ctx: RequestContext) -> Awaitable[Reply]:
    deployment = ctx.target
    assert deployment is not None
    assert ctx.model is not None
    assert ctx.upstream_route is not None
    call = deployment.call(
        ctx.upstream_route, ctx.model, ctx.body, ctx.raw, ctx.request_id, ctx.stream
    )
    if ctx.principal is not None and ctx.principal.key is not None:
        call.priority = ctx.principal.key.priority  # the key's, never the body's
    if not ctx.stream:
        return deployment.backend.send(call)
    return _open_stream(ctx, deployment.backend, call)


async def _open_stream(ctx: RequestContext, backend: Backend, call: UpstreamCall) -> Reply:
    stack = AsyncExitStack()
    try:
        chunks = await stack.enter_async_context(backend.stream(call))
        events = relay_events(chunks, ctx, strip_usage=call.strip_usage)
        # The first event is part of the attempt: a failure or a stall before it can still
        # be retried elsewhere, because the client has not been sent a byte.
        first = await anext(events, None)
    except BaseException:
        await stack.aclose()
        raise
    return StreamReply(Prefetched(first, events), stack.aclose)


class Prefetched:
    """A stream's events with its first one, already read, put back in front. After the
    first, each step is the relay's own (no coroutine of this class's in between)."""

    __slots__ = ("_first", "_rest")

    def __init__(self, first: bytes | None, rest: AsyncIterator[bytes]) -> None:
        self._first = first
        self._rest = rest

    def __aiter__(self) -> Prefetched:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        first = self._first
        if first is None:
            return self._rest.__anext__()
        self._first = None
        return _ready(first)


async def _ready(value: bytes) -> bytes:
    return value
