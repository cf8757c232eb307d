"""The last step: one call to the deployment the attempt chose (``ctx.target``).

A complete answer comes back as the upstream's bytes (the attempts step reads its usage);
a stream comes back open, once its first event has arrived, with its events framed and
its usage read as they pass (`sluice.pipeline.sse`). For a complete answer this returns the
backend's own coroutine, adding none of its own.

The call holds one of the deployment's concurrency slots (`sluice.routing.capacity`) until
the answer is read (the attempts step gives it back, `ctx.slot`) or the stream is closed;
none free means a wait in its bounded queue or a `DeploymentBusyError` at once, which the
attempts step takes as "try the next candidate".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack

from sluice.backends.base import Backend, UpstreamCall
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.sse import relay_events
from sluice.pipeline.steps import Reply
from sluice.routing.capacity import Capacity

BATCH_PRIORITY = -1
"""The embedded engine's queue order for batch lines: after every interactive request."""


def call_backend(ctx: RequestContext) -> Awaitable[Reply]:
    deployment = ctx.target
    assert deployment is not None
    assert ctx.model is not None
    assert ctx.upstream_route is not None
    call = deployment.call(
        ctx.upstream_route, ctx.model, ctx.body, ctx.raw, ctx.request_id, ctx.stream
    )
    if ctx.trace_headers is not None:  # tracing on: the attempt's span is the parent
        call.headers.update(ctx.trace_headers)
    high = False
    if ctx.batch_id is not None:
        call.priority = BATCH_PRIORITY  # batch lines queue behind every interactive request
    elif ctx.principal is not None and ctx.principal.key is not None:
        call.priority = ctx.principal.key.priority  # the key's, never the body's
        high = call.priority > 0
    capacity = deployment.capacity
    if capacity is not None and not capacity.take(high):
        return _wait_then_call(ctx, deployment.backend, call, capacity, high)
    if not ctx.stream:
        ctx.slot = capacity
        return deployment.backend.send(call)
    return _open_stream(ctx, deployment.backend, call, capacity)


async def _wait_then_call(
    ctx: RequestContext, backend: Backend, call: UpstreamCall, capacity: Capacity, high: bool
) -> Reply:
    await capacity.wait(high)  # a slot, or DeploymentBusyError (at once or at max_wait)
    if not ctx.stream:
        ctx.slot = capacity
        return await backend.send(call)
    return await _open_stream(ctx, backend, call, capacity)


async def _open_stream(
    ctx: RequestContext, backend: Backend, call: UpstreamCall, capacity: Capacity | None
) -> Reply:
    stack = AsyncExitStack()
    if capacity is not None:
        stack.callback(capacity.release)  # once, when the stream closes (or fails to open)
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
