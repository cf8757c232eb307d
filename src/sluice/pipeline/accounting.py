"""After a request: reconcile its token and budget reservations, write its usage record.

Runs once per request from the request middleware, after the last byte (or the client's
departure), so streams are settled with what they really used. When the upstream reported
no usage (a stream cut short), the prompt is counted at its bound (one token per byte of
the body, as its budget hold was) and the completion as the number of content events
relayed (which undercounts events that carry several tokens).
"""

from __future__ import annotations

from sluice.api.context import RequestContext
from sluice.pipeline.budgets import BudgetLedger, to_nano
from sluice.pipeline.costs import Rates, cost_usd
from sluice.pipeline.limits import Limiter
from sluice.pipeline.limits.window import new_tuple
from sluice.store.recorder import UsageRecorder
from sluice.store.usage import UsageRecord


class Accounting:
    def __init__(
        self,
        recorder: UsageRecorder | None,
        limiter: Limiter | None,
        prices: dict[str, Rates],
        budgets: BudgetLedger | None = None,
    ) -> None:
        self._recorder = recorder
        self._limiter = limiter
        self._budgets = budgets
        self._prices = prices

    def finish(self, ctx: RequestContext, status: int, latency_s: float) -> None:
        """Record the request's usage and settle its reservations; never waits (the record
        is written and a remote ledger's settle sent in the background). A request refused
        after something was reserved for it (a budget after the rate limiter) only gives
        its reservations back."""
        if not ctx.accepted:
            self._give_back(ctx)
            return
        # Without the upstream's usage (a stream cut short, an upstream that reports none)
        # the prompt is counted at its bound, as its budget hold was: never less than it was.
        prompt = ctx.prompt_tokens if ctx.prompt_tokens is not None else ctx.body_bytes
        completion = (
            ctx.completion_tokens if ctx.completion_tokens is not None else ctx.content_events
        )
        cost = cost_usd(self._prices.get(ctx.model or ""), prompt, completion)
        if self._recorder is not None:
            # In UsageRecord's field order, by tuple.__new__ (no Python-level constructor
            # call). latency_ms is not rounded (round() alone cost ~2.5k instructions).
            self._recorder.record(
                new_tuple(
                    UsageRecord,
                    (
                        ctx.request_id,
                        ctx.model or "",
                        ctx.created_us,
                        ctx.principal.key_id if ctx.principal is not None else None,
                        ctx.deployment,
                        prompt,
                        completion,
                        cost,
                        latency_s * 1000.0,
                        status,
                        False,  # cache_hit
                        ctx.stream,
                        ctx.client_request_id,
                    ),
                )
            )
        if ctx.ticket is not None and self._limiter is not None:
            self._limiter.settle_nowait(ctx.ticket, prompt + completion)
        if ctx.budget_hold is not None and self._budgets is not None:
            self._budgets.release_nowait(ctx.budget_hold, to_nano(cost))

    def _give_back(self, ctx: RequestContext) -> None:
        if ctx.ticket is not None and self._limiter is not None:
            self._limiter.settle_nowait(ctx.ticket, 0)
        if ctx.budget_hold is not None and self._budgets is not None:
            self._budgets.release_nowait(ctx.budget_hold, 0)
