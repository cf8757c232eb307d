"""The attempts step: send the request to the plan's deployments.

One attempt, to the plan's first candidate.
"""

from __future__ import annotations

import time

from sluice.backends.base import UpstreamReply
from sluice.errors import UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.steps import Handler, Reply
from sluice.pipeline.usage import read_body_usage


class Attempts:
    next: Handler

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    async def __call__(self, ctx: RequestContext) -> Reply:
        assert ctx.plan is not None
        deployment = ctx.plan.candidates[0]
        ctx.target = deployment
        ctx.deployment = deployment.id
        ctx.attempts = 1
        ctx.accepted = True
        ctx.upstream_started = started = time.perf_counter()
        try:
            reply = await self.next(ctx)
            if type(reply) is UpstreamReply:
                read_body_usage(reply.body, ctx)
            return reply
        except UpstreamError as exc:
            upstream_failed(self._metrics, ctx, exc)
            raise
        finally:
            # A stream's upstream time runs until its last event (the HTTP layer sets it).
            ctx.upstream_seconds = time.perf_counter() - started


def upstream_failed(metrics: GatewayMetrics, ctx: RequestContext, exc: UpstreamError) -> None:
    ctx.error_kind = exc.kind
    metrics.upstream_errors_for(ctx.model or "-", ctx.deployment or "-", exc.kind).inc()
