"""The plan step: which deployments may serve this request, in order (`sluice.routing`)."""

from __future__ import annotations

from collections.abc import Awaitable

from sluice.pipeline.context import RequestContext
from sluice.pipeline.steps import Handler, Reply
from sluice.routing.router import Router


class MakePlan:
    next: Handler

    def __init__(self, router: Router) -> None:
        self._router = router

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]:
        assert ctx.model is not None
        ctx.plan = self._router.plan(ctx.model)
        return self.next(ctx)
