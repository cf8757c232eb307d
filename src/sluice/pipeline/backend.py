"""The last step: one call to the deployment the attempt chose (``ctx.target``).

A complete answer comes back as the upstream's bytes (the attempts step reads its usage);
a stream comes back open (the upstream accepted it) with its events framed and its usage
read as they pass (`sluice.pipeline.sse`). For a complete answer this returns the
backend's own coroutine, adding none of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable
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
    except BaseException:
        await stack.aclose()
        raise
    return StreamReply(relay_events(chunks, ctx, strip_usage=call.strip_usage), stack.aclose)
