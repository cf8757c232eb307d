"""Admission for one request: who is calling, may they use this model, within budget and limits.

`identify` runs before the body is read (401 costs nothing; its first step, `recognise`,
answers a cached key without a coroutine); `admit` runs once the model is known, without a
coroutine (with Redis the caller awaits the limiter's answer and hands it to `admitted`):
403 for a model the key may not use, 429 ``budget_exceeded`` (``x-should-retry: false``)
once spend reaches the budget, then one limiter call over the key's scopes that reserves
an estimate of the tokens (prompt size + ``max_tokens``). For a key with a budget,
`reserve_budget` then holds the request's worst-case cost in the budget ledger
(`sluice.pipeline.budgets`). Both reservations are reconciled with the real usage by
`sluice.pipeline.accounting` when the request ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from typing import Any

from sluice.api.context import RequestContext
from sluice.errors import RateLimitError
from sluice.keys.store import KeyRecord
from sluice.pipeline.auth import Authenticator, Principal
from sluice.pipeline.budgets import BudgetLedger, account_name, to_nano
from sluice.pipeline.costs import Rates, cost_usd
from sluice.pipeline.limits import Admission, Limiter, LimitScope, LimitSpec
from sluice.protocol import completion_ceiling
from sluice.store.usage import from_micros

_MAX_CACHED_SCOPES = 50_000


class Guard:
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: Limiter,
        *,
        default_max_tokens: int,
        lease_seconds: float,
        budgets: BudgetLedger,
        prices: dict[str, Rates],
    ) -> None:
        self._auth = authenticator
        self._limiter = limiter
        self._budgets = budgets
        self._prices = prices  # model -> USD per million prompt / completion tokens
        # A limiter that decides without I/O is called directly (no coroutine per request).
        self._acquire_now = limiter.immediate()
        self._default_max_tokens = default_max_tokens
        self._lease = lease_seconds
        self._scopes: dict[tuple[str, str], tuple[KeyRecord, list[LimitScope]]] = {}

    def recognise(
        self, ctx: RequestContext, headers: list[tuple[bytes, bytes]], query_string: bytes
    ) -> bool:
        """Set ``ctx.principal`` from the auth cache, without a coroutine: True for a virtual
        key authenticated within the cache TTL; False sends the caller to `identify`."""
        principal = None if query_string else self._auth.recognise(headers)
        if principal is None:
            return False
        ctx.principal = principal
        return True

    async def identify(
        self,
        ctx: RequestContext,
        headers: list[tuple[bytes, bytes]],
        query_string: bytes,
        client: tuple[str, int] | None = None,
    ) -> None:
        """Set ``ctx.principal``, through the cache when it can answer; raises the 401 (429
        for a ``client``, the ASGI peer, that failed too often)."""
        if not self.recognise(ctx, headers, query_string):
            address = client[0] if client else None
            ctx.principal = await self._auth.authenticate(headers, query_string, address)

    def admit(
        self, ctx: RequestContext, model: str, body: dict[str, Any], size: int
    ) -> Awaitable[Admission] | None:
        """Admit the request or raise its 403/429. None when decided at once (the master
        key, a key without limits, the memory limiter: no coroutine per request); otherwise
        the limiter's pending answer (Redis), which the caller awaits and hands to
        `admitted` (no coroutine of the guard's in between)."""
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


_REQUEST_LINES = (
    b"x-ratelimit-limit-requests: %d\r\n"
    b"x-ratelimit-remaining-requests: %d\r\n"
    b"x-ratelimit-reset-requests: %.3fs\r\n"
)
_TOKEN_LINES = (
    b"x-ratelimit-limit-tokens: %d\r\n"
    b"x-ratelimit-remaining-tokens: %d\r\n"
    b"x-ratelimit-reset-tokens: %.3fs\r\n"
)
_BOTH_LINES = _REQUEST_LINES + _TOKEN_LINES


def ratelimit_header_block(admission: Admission) -> bytes:
    """OpenAI's x-ratelimit-* headers for ``admission`` as HTTP header lines, for servers
    with the ``sluice.header_block`` extension (`sluice.http_protocol`): one formatting
    operation, as it runs for every response of a limited key."""
    a = admission
    if a.limit_requests is not None:
        if a.limit_tokens is not None:
            return _BOTH_LINES % (
                a.limit_requests,
                a.remaining_requests or 0,
                a.reset_requests or 0,
                a.limit_tokens,
                a.remaining_tokens or 0,
                a.reset_tokens or 0,
            )
        return _REQUEST_LINES % (
            a.limit_requests,
            a.remaining_requests or 0,
            a.reset_requests or 0,
        )
    if a.limit_tokens is not None:
        return _TOKEN_LINES % (a.limit_tokens, a.remaining_tokens or 0, a.reset_tokens or 0)
    return b""


def ratelimit_headers(admission: Admission, out: list[tuple[bytes, bytes]]) -> None:
    """Append the headers of `ratelimit_header_block` to ``out`` as ASGI header pairs, for
    servers without the extension (their one source is the block's format)."""
    for line in ratelimit_header_block(admission).split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            out.append((name, value))
