"""Who is calling a route that is not a pipeline route (the models listing, files, batches):
the same identification as the pipeline's first step, on the request's own context."""

from __future__ import annotations

from starlette.types import Scope

from sluice.pipeline.auth import Principal
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.identify import Identify


def describe_client(ctx: RequestContext, scope: Scope) -> None:
    """What the identification reads: the headers, the query string, the address."""
    ctx.headers = scope["headers"]
    ctx.query_string = scope["query_string"]
    ctx.client = scope.get("client")


async def caller(identify: Identify | None, scope: Scope) -> Principal | None:
    """The caller (raises the 401); None when the gateway runs without keys."""
    if identify is None:
        return None
    ctx: RequestContext = scope[SCOPE_KEY]
    describe_client(ctx, scope)
    await identify.identify(ctx)
    return ctx.principal
