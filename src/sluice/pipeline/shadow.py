"""Shadow traffic: a share of an alias's requests copied to a shadow model, whose answers
are compared with the primary's and thrown away.

The step (`Shadow`, after plan and before attempts) draws whether to mirror a request
(``shadow.percent``). A mirrored request's copy leaves at once in a background task
(`ShadowTraffic`), beside the primary and never awaited by it: the client gets the
primary's answer as soon as there is one, whatever the shadow does. The copy:

- is one call to the shadow model's first candidate: no retries, no fallbacks, its own
  timeout; at most ``max_in_flight`` copies run at once and a copy beyond that is dropped
  (counted), so a slow shadow cannot pile up work;
- is always a complete (non-streaming) request, with the client's body otherwise
  unchanged (copied only when it must change: a stream's);
- is never returned, never charged to the key's limits or budget, and writes no usage
  record: it shows in metrics (``sluice_shadow_*``) and in one log line per comparison;
- is compared with the primary once both have finished: upstream time (as a ratio),
  completion tokens (from usage), and for a complete primary answer whether the content
  (each choice's message or text, or the embeddings) matched exactly. A streamed primary
  is compared on time and tokens only: its text is not assembled, so the relay stays as
  it is.

The step is linked into the pipeline only while some alias has a shadow (`ShadowLink`,
which a reload calls), so a gateway without one pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.backends.base import UpstreamCall
from sluice.errors import SluiceError, UpstreamStatusError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.steps import Handler, Reply, Step
from sluice.pipeline.usage import plausible_tokens
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.router import Router
from sluice.routing.table import Table

log = logging.getLogger("sluice.shadow")

MAX_IN_FLIGHT = 64
SHADOW_TIMEOUT = 60.0
"""Seconds a copy may take, and then wait for its primary to finish, before it is given up."""


@dataclass(slots=True, frozen=True)
class PrimaryResult:
    seconds: float
    completion_tokens: int | None
    body: bytes | None
    """A complete answer's bytes; None for a stream."""


Primary = asyncio.Future[PrimaryResult | None]
"""What the primary's request came to: None when it failed or was abandoned."""


class Shadow:
    """The step: mirror a share of each shadowed alias's requests (`ShadowTraffic`)."""

    next: Handler

    def __init__(
        self, router: Router, traffic: ShadowTraffic, rng: random.Random | None = None
    ) -> None:
        self._router = router
        self._traffic = traffic
        self._rng = rng or random.Random()

    async def __call__(self, ctx: RequestContext) -> Reply:
        assert ctx.model is not None
        shadow = self._router.shadow(ctx.model)
        if shadow is None or self._rng.random() * 100.0 >= shadow.percent:
            return await self.next(ctx)
        primary = self._traffic.mirror(ctx, shadow.model)
        if primary is None:
            return await self.next(ctx)
        try:
            reply = await self.next(ctx)
        except BaseException:
            _settle(primary, None)
            raise
        if isinstance(reply, StreamReply):
            ctx.then_at_end(lambda ended: _settle(primary, _streamed(ended)))
        else:
            _settle(primary, PrimaryResult(ctx.upstream_seconds, ctx.completion_tokens, reply.body))
        return reply


def _streamed(ctx: RequestContext) -> PrimaryResult | None:
    if ctx.error_kind is not None or ctx.client_disconnected:
        return None
    return PrimaryResult(ctx.upstream_seconds, ctx.completion_tokens, None)


def _settle(primary: Primary, result: PrimaryResult | None) -> None:
    if not primary.done():
        primary.set_result(result)


class ShadowTraffic:
    """Sends the copies in background tasks (each one's reference kept until it ends),
    compares them, and cancels those still running when the app stops."""

    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout: float = SHADOW_TIMEOUT,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def mirror(self, ctx: RequestContext, model: str) -> Primary | None:
        """Send ``ctx``'s copy to ``model`` now; the future the caller settles with the
        primary's result. None when the copy was dropped (too many in flight) or
        ``model`` is no longer served."""
        alias = ctx.model
        assert alias is not None
        assert ctx.upstream_route is not None
        assert ctx.plan is not None
        if len(self._tasks) >= self._max_in_flight:
            self._metrics.shadow_requests.labels(alias, "dropped").inc()
            return None
        try:
            plan = self._router.plan(model)
        except KeyError:
            return None
        body, raw = ctx.body, ctx.raw
        if ctx.stream:  # the copy is a complete request
            body = {k: v for k, v in body.items() if k != "stream_options"}
            body["stream"] = False
            raw = None
        deployment = plan.candidates[0]
        call = deployment.call(ctx.upstream_route, alias, body, raw, ctx.request_id, False)
        primary: Primary = asyncio.get_running_loop().create_future()
        compare = _Comparison(alias, ctx.plan.model, model, ctx.request_id, ctx.upstream_route)
        task = asyncio.create_task(self._run(deployment, call, primary, compare))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._metrics.shadow_requests.labels(alias, "sent").inc()
        return primary

    async def _run(
        self, deployment: Deployment, call: UpstreamCall, primary: Primary, compare: _Comparison
    ) -> None:
        started = self._clock()
        # Cancelled (the app stopping) or a backend's bug says nothing of the deployment.
        outcome, seconds = Outcome.NO_VERDICT, None
        deployment.begin()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await deployment.backend.send(call)
            outcome, seconds = Outcome.OK, self._clock() - started
        except (SluiceError, TimeoutError) as exc:
            throttled = isinstance(exc, UpstreamStatusError) and exc.upstream_status == 429
            outcome = Outcome.THROTTLED if throttled else Outcome.FAILED
            self._failed(compare, exc)
            return
        except Exception as exc:  # a backend's bug: reported, never raised into the loop
            log.exception("shadow request failed", extra={"request_id": compare.request_id})
            self._failed(compare, exc)
            return
        finally:
            deployment.end(outcome, seconds)
        try:
            async with asyncio.timeout(self._timeout):
                result = await primary
        except TimeoutError:
            return
        if result is not None:
            compare.report(self._metrics, seconds, reply.body, result)

    def _failed(self, compare: _Comparison, exc: BaseException) -> None:
        self._metrics.shadow_requests.labels(compare.alias, "failed").inc()
        kind = exc.kind if isinstance(exc, SluiceError) else type(exc).__name__
        log.info(
            "shadow request failed",
            extra={
                "request_id": compare.request_id,
                "alias": compare.alias,
                "shadow_model": compare.shadow_model,
                "error": kind,
            },
        )

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True, frozen=True)
class _Comparison:
    alias: str
    model: str
    """The version that served the primary."""
    shadow_model: str
    request_id: str
    route: str

    def report(
        self, metrics: GatewayMetrics, seconds: float, body: bytes, primary: PrimaryResult
    ) -> None:
        shadow = _parse(body)
        tokens = _completion_tokens(shadow)
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "alias": self.alias,
            "model": self.model,
            "shadow_model": self.shadow_model,
            "primary_ms": round(primary.seconds * 1000, 3),
            "shadow_ms": round(seconds * 1000, 3),
            "primary_completion_tokens": primary.completion_tokens,
            "shadow_completion_tokens": tokens,
        }
        if primary.seconds > 0:
            metrics.shadow_latency_ratio.labels(self.alias).observe(seconds / primary.seconds)
        if primary.completion_tokens is not None:
            metrics.shadow_tokens.labels(self.alias, "primary").inc(primary.completion_tokens)
        if tokens is not None:
            metrics.shadow_tokens.labels(self.alias, "shadow").inc(tokens)
        if primary.body is not None:
            answer = _content(self.route, _parse(primary.body))
            match = answer is not None and answer == _content(self.route, shadow)
            metrics.shadow_matches.labels(self.alias, "match" if match else "mismatch").inc()
            record["match"] = match
        log.info("shadow compared", extra=record)


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _completion_tokens(answer: dict[str, Any] | None) -> int | None:
    usage = answer.get("usage") if answer is not None else None
    return plausible_tokens(usage.get("completion_tokens")) if isinstance(usage, dict) else None


def _content(route: str, answer: dict[str, Any] | None) -> list[Any] | None:
    """What two answers must share to match exactly: each choice's message content (chat)
    or text (completions), or each embedding; None for a body of another shape."""
    if answer is None:
        return None
    items = answer.get("data" if route == "embeddings" else "choices")
    if not isinstance(items, list):
        return None
    content: list[Any] = []
    for item in items:
        if not isinstance(item, dict):
            return None
        if route == "embeddings":
            content.append(item.get("embedding"))
        elif route == "completions":
            content.append(item.get("text"))
        else:
            message = item.get("message")
            content.append(message.get("content") if isinstance(message, dict) else None)
    return content


class ShadowLink:
    """Keeps the shadow step right after ``after`` (the plan step, or the cache step: a
    request answered from the cache is not copied) while some alias has a shadow, and out
    of the pipeline otherwise: called with each table the router swaps in."""

    def __init__(self, after: Step, shadow: Shadow) -> None:
        self._after = after
        self._shadow = shadow

    def update(self, table: Table) -> None:
        linked = self._after.next is self._shadow
        if table.shadowed and not linked:
            self._shadow.next = self._after.next
            self._after.next = self._shadow
        elif linked and not table.shadowed:
            self._after.next = self._shadow.next
