"""The identify step: who is calling. Runs before the body is read, so a 401 costs nothing."""

from __future__ import annotations

from collections.abc import Awaitable

from sluice.pipeline.auth import Authenticator
from sluice.pipeline.context import RequestContext
from sluice.pipeline.steps import Handler, Reply


class Identify:
    """Sets ``ctx.principal`` from the ``Authorization`` / ``api-key`` header (401), through
    the authenticator's cache when it can answer (429 for a client address that failed
    too often)."""

    next: Handler

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]:
        if self.recognise(ctx):  # a cached key: no coroutine of this step's
            return self.next(ctx)
        return self._identify_then_next(ctx)

    async def _identify_then_next(self, ctx: RequestContext) -> Reply:
        await self.identify(ctx)
        return await self.next(ctx)

    def recognise(self, ctx: RequestContext) -> bool:
        """Set ``ctx.principal`` from the auth cache, without a coroutine: True for a virtual
        key authenticated within the cache TTL; False sends the caller to `identify`."""
        principal = None if ctx.query_string else self._auth.recognise(ctx.headers)
        if principal is None:
            return False
        ctx.principal = principal
        return True

    async def identify(self, ctx: RequestContext) -> None:
        """Set ``ctx.principal``, through the cache when it can answer; raises the 401."""
        if not self.recognise(ctx):
            address = ctx.client[0] if ctx.client else None
            ctx.principal = await self._auth.authenticate(ctx.headers, ctx.query_string, address)
