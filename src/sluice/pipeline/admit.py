"""The admit step: may this caller use this model now, within its budget and limits; and,
in the same step, settling what was reserved once the request's real usage is known.

403 for a model the key may not use, 429 ``budget_exceeded`` (``x-should-retry: false``)
once spend reaches the budget, then one limiter call over the key's scopes that reserves
an estimate of the tokens (prompt size + ``max_tokens``): decided without a coroutine in
memory, awaited on Redis. For a key with a budget the request's worst-case cost is then
held in the budget ledger (`sluice.pipeline.budgets`). Both reservations are settled with
the real usage (`sluice.pipeline.accounting.charged`) when the request ends: in this
step's ``finally`` for a complete answer, after the last byte for a stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from typing import Any

from sluice.errors import RateLimitError
from sluice.keys.store import KeyRecord
from sluice.pipeline.accounting import charged
from sluice.pipeline.auth import Principal
from sluice.pipeline.budgets import BudgetLedger, account_name, to_nano
from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import Rates, cost_usd
from sluice.pipeline.limits import Admission, Limiter, LimitScope, LimitSpec
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.steps import Handler, Reply
from sluice.protocol import completion_ceiling
from sluice.store.usage import from_micros

_MAX_CACHED_SCOPES = 50_000


class Admit:
    next: Handler

    def __init__(
        self,
        limiter: Limiter,
        *,
        default_max_tokens: int,
        lease_seconds: float,
        budgets: BudgetLedger,
        prices: dict[str, Rates],
    ) -> None:
        self._limiter = limiter
        self._budgets = budgets
        self._prices = prices  # model -> USD per million prompt / completion tokens
        # A limiter that decides without I/O is called directly (no coroutine per request).
        self._acquire_now = limiter.immediate()
        self._default_max_tokens = default_max_tokens
        self._lease = lease_seconds
        self._scopes: dict[tuple[str, str], tuple[KeyRecord, list[LimitScope]]] = {}

    async def __call__(self, ctx: RequestContext) -> Reply:
        model = ctx.model
        assert model is not None
        waiting = self.admit(ctx, model, ctx.body, ctx.body_bytes)
        if waiting is not None:
            admitted(ctx, await waiting)
        try:
            reserving = self.reserve_budget(ctx, model, ctx.body, ctx.body_bytes)
            if reserving is not None and await reserving:
                ctx.raw = None  # the body now carries the completion ceiling its hold assumed
            reply = await self.next(ctx)
        except BaseException:
            self.settle(ctx)
            raise
        if isinstance(reply, StreamReply):
            ctx.then_at_end(self.settle)  # a stream's usage is known after its last event
        else:
            self.settle(ctx)
        return reply

    def settle(self, ctx: RequestContext) -> None:
        """Replace the reservations with what the request really used (nothing, for one
        refused or failed before it reached a backend); never waits."""
        if ctx.accepted:
            prompt, completion, cost = charged(ctx, self._prices)
            if ctx.ticket is not None:
                # A cached answer used no upstream tokens: it counts toward RPM only.
                used = 0 if ctx.cache_hit else prompt + completion
                self._limiter.settle_nowait(ctx.ticket, used)
            if ctx.budget_hold is not None:
                self._budgets.release_nowait(ctx.budget_hold, to_nano(cost))
            return
        if ctx.ticket is not None:
            self._limiter.settle_nowait(ctx.ticket, 0)
        if ctx.budget_hold is not None:
            self._budgets.release_nowait(ctx.budget_hold, 0)

    def admit(
        self, ctx: RequestContext, model: str, body: dict[str, Any], size: int
    ) -> Awaitable[Admission] | None:
        """Admit the request or raise its 403/429. None when decided at once (the master
        key, a key without limits, the memory limiter: no coroutine per request); otherwise
        the limiter's pending answer (Redis), which the caller awaits and hands to
        `admitted` (no coroutine of the step's in between)."""
        principal: Principal | None = ctx.principal
        if principal is None or principal.key is None:
            return None  # the master key is not limited
        key = principal.key
        if key.models is not None and model not in key.models:
            principal.authorize(model)  # raises the 403
        if key.budget_usd is not None and key.spend_usd >= key.budget_usd:
            raise _over_budget(key)
        cached = self._scopes.get((key.id, model))
        if cached is not None and cached[0] is key:
            scopes = cached[1]
        else:  # built once per key record (the auth cache's) and model
            scopes = _scopes(key.id, key.rpm, key.tpm, key.max_parallel, key.model_limits, model)
            if len(self._scopes) >= _MAX_CACHED_SCOPES:
                self._scopes.clear()
            self._scopes[(key.id, model)] = (key, scopes)
        if not scopes:
            return None
        completion, _ = completion_ceiling(ctx.route, body, self._default_max_tokens)
        tokens = ctx.prompt_estimate + completion
        if self._acquire_now is None:
            return self._limiter.acquire(scopes, tokens, ctx.request_id, self._lease)
        admitted(ctx, self._acquire_now(scopes, tokens, ctx.request_id, self._lease))
        return None

    def reserve_budget(
        self, ctx: RequestContext, model: str, body: dict[str, Any], size: int
    ) -> Awaitable[bool] | None:
        """For a key with a budget, hold the request's worst-case cost in the ledger (the
        caller awaits it; 429 ``budget_exceeded`` when it does not fit). None for every
        other request. The awaitable's True says ``body`` was changed: a request that set
        no completion ceiling is sent the one its hold assumed (``max_tokens``), so that
        the hold really bounds what the upstream may write."""
        principal = ctx.principal
        if principal is None or principal.key is None or principal.key.budget_usd is None:
            return None
        return self._reserve(ctx, principal.key, model, body, size)

    async def _reserve(
        self, ctx: RequestContext, key: KeyRecord, model: str, body: dict[str, Any], size: int
    ) -> bool:
        assert key.budget_usd is not None
        completion, explicit = completion_ceiling(ctx.route, body, self._default_max_tokens)
        # The prompt at its bound (one token per byte), not the rate limiter's estimate.
        worst = cost_usd(self._prices.get(model), size, completion)
        budget = to_nano(key.budget_usd)
        # Only the comparison with the budget matters: past it, any amount refuses alike
        # (and an absurd max_tokens cannot overflow the ledger's integers).
        amount = min(to_nano(worst, up=True), budget + 1)
        # The period is the one the request is made in, and its usage record is dated the
        # same instant: a request that ends after the period rolls over is charged to the
        # period that held its cost. (The cached key record may predate the roll-over.)
        ctx.created_us = time.time_ns() // 1000
        current = key.rolled(from_micros(ctx.created_us))
        hold = await self._budgets.reserve(
            account_name(key.id, current.period_started_at),
            ctx.request_id,
            amount,
            budget,
            to_nano(current.spend_usd),
        )
        if hold is None:
            raise _over_budget(key, in_flight=True)
        ctx.budget_hold = hold
        if explicit:
            return False
        body["max_tokens"] = self._default_max_tokens
        return True


def admitted(ctx: RequestContext, admission: Admission) -> None:
    """Keep the limiter's answer on the request (its headers, its ticket); raise the 429."""
    ctx.admission = admission
    if not admission.allowed:
        raise _refusal(admission)
    ctx.ticket = admission.ticket


_PERIOD_NOUN = {"daily": "day", "weekly": "week", "monthly": "month"}


def _over_budget(key: KeyRecord, *, in_flight: bool = False) -> RateLimitError:
    period = f" for this {_PERIOD_NOUN[key.budget_period]}" if key.budget_period else ""
    spent = (
        "with the requests in flight, this request could exceed"
        if in_flight
        else f"has spent ${key.spend_usd:.4f} of"
    )
    return RateLimitError(
        f"Budget exceeded: the API key {key.display} {spent} its ${key.budget_usd:.2f} "
        f"budget{period}.",
        code="budget_exceeded",
        headers={"x-should-retry": "false"},
    )


def _scopes(
    key_id: str,
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
    model_limits: dict[str, dict[str, int]] | None,
    model: str,
) -> list[LimitScope]:
    scopes = []
    if rpm is not None or tpm is not None or max_parallel is not None:
        scopes.append(LimitScope(f"key:{key_id}", LimitSpec(rpm, tpm, max_parallel)))
    per_model = (model_limits or {}).get(model)
    if per_model:
        spec = LimitSpec(per_model.get("rpm"), per_model.get("tpm"), per_model.get("max_parallel"))
        scopes.append(LimitScope(f"key:{key_id}:model:{model}", spec))
    return scopes


def _refusal(admission: Admission) -> RateLimitError:
    wait = max(admission.retry_after, 0.001)
    what = {
        "rpm": "requests per minute",
        "tpm": "tokens per minute",
        "parallel": "concurrent requests",
    }.get(admission.reason or "", "rate")
    return RateLimitError(
        f"Rate limit reached for {what}. Please retry after {wait:.3f} seconds.",
        code=f"rate_limit_{admission.reason or 'exceeded'}",
        headers={
            "Retry-After": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        },
    )
