"""The plan step: which deployments may serve this request, in order (`sluice.routing`).

For an alias the router picks the version first (`sluice.routing.versions`); a sticky
alias's requests are keyed by the body's ``user`` or by a configured header, worked out
here and only for those aliases. ``ctx.model`` stays the name the client sent (what the
key was checked against and what the body carries); ``ctx.plan.model`` is the model that
serves, and is what the request is charged as (`sluice.pipeline.accounting`).
"""

from __future__ import annotations

from collections.abc import Awaitable

from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.request import model_not_found
from sluice.pipeline.steps import Handler, Reply
from sluice.routing.router import Router
from sluice.routing.settings import StickySettings
from sluice.routing.versions import MAX_STICKY_KEY


class MakePlan:
    next: Handler

    def __init__(self, router: Router, metrics: GatewayMetrics) -> None:
        self._router = router
        self._metrics = metrics

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]:
        model = ctx.model
        assert model is not None
        router = self._router
        sticky = router.sticky(model)
        try:
            plan = router.plan(model, None if sticky is None else sticky_key(sticky, ctx))
        except KeyError:  # a reload removed the model after the request was read
            raise model_not_found(model) from None
        if plan.model != model:
            self._metrics.alias_choices_for(model, plan.model).inc()
        ctx.plan = plan
        return self.next(ctx)


def sticky_key(sticky: StickySettings, ctx: RequestContext) -> str | None:
    """What keeps a request on its version: the body's ``user`` (a string), or the
    configured header's value; None when the request has none (a random version)."""
    if sticky.by == "user":
        user = ctx.body.get("user")
        return user[:MAX_STICKY_KEY] if isinstance(user, str) and user else None
    assert sticky.header is not None
    wanted = sticky.header.lower().encode("latin-1")
    for name, value in ctx.headers:
        if name == wanted:
            return value[:MAX_STICKY_KEY].decode("latin-1") or None
    return None
