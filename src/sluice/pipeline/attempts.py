"""The attempts step: send the request to the plan's deployments.

One attempt, to the plan's first candidate.
"""

from __future__ import annotations

import time

from sluice.backends.base import UpstreamReply
from sluice.errors import UpstreamError, UpstreamStatusError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.steps import Handler, Reply
from sluice.pipeline.usage import read_body_usage
from sluice.routing.deployment import Outcome


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
        # Interim, until the retrying attempts step lands: every attempt is reported to
        # its deployment (health and balancing), a stream's when it ends.
        deployment.begin()
        try:
            reply = await self.next(ctx)
            if type(reply) is UpstreamReply:
                read_body_usage(reply.body, ctx)
        except UpstreamError as exc:
            deployment.end(_outcome(exc), None)
            upstream_failed(self._metrics, ctx, exc)
            raise
        except BaseException:
            deployment.end(Outcome.OK, None)
            raise
        finally:
            # A stream's upstream time runs until its last event (the HTTP layer sets it).
            ctx.upstream_seconds = time.perf_counter() - started
        first_byte = ctx.upstream_seconds
        if isinstance(reply, StreamReply):
            ctx.then_at_end(lambda ctx: deployment.end(Outcome.OK, first_byte))
        else:
            deployment.end(Outcome.OK, first_byte)
        return reply


def upstream_failed(metrics: GatewayMetrics, ctx: RequestContext, exc: UpstreamError) -> None:
    ctx.error_kind = exc.kind
    metrics.upstream_errors_for(ctx.model or "-", ctx.deployment or "-", exc.kind).inc()


def _outcome(exc: UpstreamError) -> Outcome:
    if isinstance(exc, UpstreamStatusError) and exc.upstream_status < 500:
        return Outcome.THROTTLED if exc.upstream_status == 429 else Outcome.OK
    return Outcome.FAILED
