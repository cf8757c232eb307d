"""The last step: one call to the deployment the attempt chose (``ctx.target``).

A complete answer comes back as the upstream's bytes, its usage read from the body's
tail; a stream comes back open (the upstream accepted it) with its events framed and its
usage read as they pass (`sluice.pipeline.sse`).

The call holds one of the deployment's concurrency slots (`sluice.routing.capacity`) until
the answer is read, or the stream closed; none free means a wait in its bounded queue or a
`DeploymentBusyError` at once, which the attempts step takes as "try the next candidate".
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.sse import relay_events
from sluice.pipeline.steps import Reply
from sluice.pipeline.usage import read_body_usage


async def call_backend(ctx: RequestContext) -> Reply:
    deployment = ctx.target
    assert deployment is not None
    assert ctx.model is not None
    assert ctx.upstream_route is not None
    call = deployment.call(
        ctx.upstream_route, ctx.model, ctx.body, ctx.raw, ctx.request_id, ctx.stream
    )
    high = False
    if ctx.principal is not None and ctx.principal.key is not None:
        call.priority = ctx.principal.key.priority  # the key's, never the body's
        high = call.priority > 0
    capacity = deployment.capacity
    if capacity is not None and not capacity.take(high):
        await capacity.wait(high)  # a slot, or DeploymentBusyError (at once or at max_wait)
    if not ctx.stream:
        try:
            reply = await deployment.backend.send(call)
        finally:
            if capacity is not None:
                capacity.release()
        read_body_usage(reply.body, ctx)
        return reply
    stack = AsyncExitStack()
    if capacity is not None:
        stack.callback(capacity.release)  # once, when the stream closes (or fails to open)
    try:
        chunks = await stack.enter_async_context(deployment.backend.stream(call))
    except BaseException:
        await stack.aclose()
        raise
    return StreamReply(relay_events(chunks, ctx, strip_usage=call.strip_usage), stack.aclose)
