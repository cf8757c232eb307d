"""Reading the request: the body (after identification, so a 401 costs no read), its
validation, and the model it names."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from sluice.backends.base import Route
from sluice.errors import ModelNotFoundError
from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import prompt_estimate
from sluice.pipeline.steps import Handler, Reply
from sluice.protocol import parse_json_object, validate


class ReadRequest:
    """Parses and validates the body (400 naming the field) and refuses a model the gateway
    does not serve (404) before anything is reserved for it."""

    next: Handler

    def __init__(self, serves: Callable[[str], bool]) -> None:
        self._serves = serves

    async def __call__(self, ctx: RequestContext) -> Reply:
        assert ctx.read_body is not None
        raw = await ctx.read_body()
        body = parse_json_object(raw)
        route = cast(Route, ctx.route)
        model = validate(route, body)
        if not self._serves(model):
            raise model_not_found(model)
        ctx.upstream_route = route
        ctx.model = model
        ctx.body = body
        ctx.raw = raw
        ctx.prompt_estimate = prompt_estimate(len(raw))
        ctx.body_bytes = len(raw)
        ctx.stream = route != "embeddings" and body.get("stream") is True
        if "priority" in body:  # queue order is the key's (the call's priority), not the client's
            del body["priority"]
            ctx.raw = None
        return await self.next(ctx)


def model_not_found(model: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        param="model",
    )
