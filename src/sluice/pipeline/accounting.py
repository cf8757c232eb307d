"""After a request: what it is charged, and its usage record.

`charged` works out the tokens and cost once per request (the admit step settles its
reservations with them; `Accounting.finish` records them). When the upstream reported no
usage (a stream cut short), the prompt is counted at its bound (one token per byte of the
body, as its budget hold was) and the completion as the number of content events relayed
(which undercounts events that carry several tokens). An answer from the cache costs
nothing: its tokens are recorded, at zero cost (`sluice.cache.step`).

A request to an alias is charged, and recorded, as the version that served it (each model
has its own prices); its budget hold was taken at the alias's price, the most any of its
versions charges (`sluice.pipeline.costs.price_table`).
"""

from __future__ import annotations

from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import Rates, cost_usd
from sluice.pipeline.limits.window import new_tuple
from sluice.store.recorder import UsageRecorder
from sluice.store.usage import UsageRecord


def charged(ctx: RequestContext, prices: dict[str, Rates]) -> tuple[int, int, float]:
    """Prompt tokens, completion tokens and cost of ``ctx`` (worked out once, then kept)."""
    if ctx.charged is not None:
        return ctx.charged
    # Without the upstream's usage (a stream cut short, an upstream that reports none)
    # the prompt is counted at its bound, as its budget hold was: never less than it was.
    prompt = ctx.prompt_tokens if ctx.prompt_tokens is not None else ctx.body_bytes
    completion = ctx.completion_tokens if ctx.completion_tokens is not None else ctx.content_events
    if ctx.cache_hit:  # no upstream call of its own: the tokens are recorded, not priced
        ctx.charged = (prompt, completion, 0.0)
        return ctx.charged
    rates = prices.get(served_model(ctx))
    ctx.charged = (prompt, completion, cost_usd(rates, prompt, completion))
    return ctx.charged


def served_model(ctx: RequestContext) -> str:
    """The model that served the request (an alias's version), as it is priced and
    recorded; the name the client sent when nothing was planned."""
    return ctx.plan.model if ctx.plan is not None else ctx.model or ""


class Accounting:
    def __init__(self, recorder: UsageRecorder | None, prices: dict[str, Rates]) -> None:
        self._recorder = recorder
        self._prices = prices

    def finish(self, ctx: RequestContext, status: int, latency_s: float) -> None:
        """Write the usage record of a request that reached a backend; never waits (the
        recorder writes in the background)."""
        if not ctx.accepted or self._recorder is None:
            return
        self._recorder.record(self.record_of(ctx, status, latency_s))

    def record_of(self, ctx: RequestContext, status: int, latency_s: float) -> UsageRecord:
        """The usage record of a request that reached a backend (``ctx.accepted``)."""
        prompt, completion, cost = charged(ctx, self._prices)
        # In UsageRecord's field order, by tuple.__new__ (no Python-level constructor call).
        return new_tuple(
            UsageRecord,
            (
                ctx.request_id,
                served_model(ctx),
                ctx.created_us,
                ctx.principal.key_id if ctx.principal is not None else None,
                ctx.deployment,
                prompt,
                completion,
                cost,
                latency_s * 1000.0,
                status,
                ctx.cache_hit,
                ctx.stream,
                ctx.client_request_id,
                ctx.batch_id,
            ),
        )
