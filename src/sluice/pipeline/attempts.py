"""The attempts step: send the request to the plan's deployments, then to its fallback
models, until one answers. It is the only retry loop between a client and an upstream: one
client request makes at most ``resilience.retries.attempts`` upstream calls.

The order, after a failure (what each failure means: `sluice.pipeline.failures`):

1. the plan's other candidates, at once (a deployment not tried yet is likelier to answer
   than one that just failed, and needs no backoff);
2. the fallback models, in order, each with its own plan: ``fallbacks`` after a failure of
   the upstream's, ``context_window_fallbacks`` after a prompt too long for the context
   window, ``content_policy_fallbacks`` after a refusal of the content;
3. again the deployments whose failure was safe to repeat (connect errors, resets,
   timeouts, 5xx, 408, 429), in the order they were first tried, each after a backoff
   with full jitter (a random wait up to ``backoff_initial * 2^n``, capped at
   ``backoff_max``) and never before a 429's Retry-After has passed (a deployment that
   asks for a longer wait than ``backoff_max`` is not waited for).

Every call counts toward ``attempts`` except one refused by load shedding
(`DeploymentBusyError`: no call was made). No attempt starts ``deadline`` seconds after the
first, and no backoff sleeps past it. Every call after the request's first is a retry
taken from its deployment's retry budget (`sluice.pipeline.retry_budget`); a deployment
whose budget is empty is skipped. The client then gets the last upstream failure (a busy
503 only when no call was made; a 503 ``upstream_unreachable`` when no call reached an
upstream: every deployment is down), with ``x-should-retry: false`` when the gateway did
the retrying, so that the official SDKs do not multiply it.

A fallback model must be one the caller's key may use, and, for a request holding part of
a budget, no dearer per token than the model its hold was priced at. ``ctx.plan`` becomes
the fallback's plan, so the request is charged and recorded as the model that served (its
plan's model, `sluice.pipeline.accounting`); ``ctx.model`` and the body keep the name the
client sent, which each deployment's call rewrites to its own. Every answer says what happened:
``x-sluice-deployment``, ``x-sluice-model`` and ``x-sluice-attempts``.

Each attempt calls ``deployment.begin()`` and then ``end()`` exactly once: at once for a
complete answer or a failure, when the last byte is relayed for a stream (FAILED if it
broke mid-stream). ``end(OK, None)`` means no verdict: the attempt was refused by load
shedding, cancelled, or failed in the gateway itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial

from sluice.errors import (
    ServiceUnavailableError,
    SluiceError,
    UpstreamError,
    UpstreamStatusError,
)
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import Rates
from sluice.pipeline.failures import Failure, Next, judge
from sluice.pipeline.headers import header_value
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.retry_budget import RetryBudgets
from sluice.pipeline.steps import Handler, Reply
from sluice.pipeline.usage import read_body_usage
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.plan import Plan
from sluice.routing.router import Router
from sluice.routing.settings import RetrySettings

Headers = bytes
"""Response header lines (`sluice.http_protocol.HEADER_BLOCK`)."""
_MAX_CACHED_HEADERS = 4096


class Attempts:
    next: Handler

    def __init__(
        self,
        metrics: GatewayMetrics,
        router: Router,
        settings: RetrySettings,
        prices: dict[str, Rates],
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._metrics = metrics
        self._router = router
        self._settings = settings
        self._prices = prices
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._budgets = RetryBudgets(
            settings.budget_ratio, settings.budget_min_per_second, on_balance=self._budget_left
        )
        # The headers of an answer served at the first call, per deployment: (model, headers).
        self._first_headers: dict[str, tuple[str, Headers]] = {}

    async def __call__(self, ctx: RequestContext) -> Reply:
        plan = ctx.plan
        assert plan is not None
        deployment = plan.candidates[0]
        ctx.accepted = True
        ctx.target = deployment
        ctx.deployment = deployment.id
        ctx.upstream_started = started = self._clock()
        self._budgets[deployment.id].deposit(started)
        # The first attempt is written out here, not awaited through `_attempt`: the
        # request served at once (nearly all of them) pays for no coroutine of its own.
        deployment.begin()
        try:
            try:
                reply = await self.next(ctx)
            except SluiceError as error:
                failure = self._failed(ctx, deployment, error, started)
            except BaseException:
                self._interrupted(ctx, deployment)
                raise
            else:
                self._served(ctx, deployment, reply, started)
                ctx.response_headers = self._served_headers(deployment.id, plan.model)
                return reply
            return await self._recover(ctx, plan, deployment, failure, started)
        finally:
            # A stream's upstream time runs until its last event (the HTTP layer sets it).
            ctx.upstream_seconds = self._clock() - started
            if ctx.attempts != 1:
                self._metrics.attempts.observe(ctx.attempts)

    async def _attempt(
        self, ctx: RequestContext, deployment: Deployment, now: float
    ) -> Reply | Failure:
        """One call to ``deployment``: its reply, or what its failure means."""
        ctx.target = deployment
        ctx.deployment = deployment.id
        deployment.begin()
        try:
            reply = await self.next(ctx)
        except SluiceError as error:
            return self._failed(ctx, deployment, error, now)
        except BaseException:
            self._interrupted(ctx, deployment)
            raise
        self._served(ctx, deployment, reply, now)
        return reply

    def _served(
        self, ctx: RequestContext, deployment: Deployment, reply: Reply, now: float
    ) -> None:
        if ctx.slot is not None:
            _give_back_slot(ctx)
        ctx.attempts += 1
        first_byte = self._clock() - now
        if type(reply) is StreamReply:
            ctx.then_at_end(partial(_stream_ended, deployment, first_byte))
        else:
            read_body_usage(reply.body, ctx)  # type: ignore[union-attr]  # an UpstreamReply
            deployment.end(Outcome.OK, first_byte)

    def _failed(
        self, ctx: RequestContext, deployment: Deployment, error: SluiceError, now: float
    ) -> Failure:
        if ctx.slot is not None:
            _give_back_slot(ctx)
        failure = judge(error)
        first_byte = self._clock() - now if failure.responded else None
        throttled = failure.outcome is Outcome.THROTTLED
        deployment.end(failure.outcome, first_byte, failure.retry_after if throttled else None)
        if failure.next is not Next.BUSY:
            ctx.attempts += 1
            if isinstance(error, UpstreamError):
                upstream_failed(self._metrics, ctx, error)
        return failure

    def _interrupted(self, ctx: RequestContext, deployment: Deployment) -> None:
        if ctx.slot is not None:
            _give_back_slot(ctx)
        deployment.end(Outcome.NO_VERDICT, None)  # cancelled, or the gateway's fault
        ctx.attempts += 1

    async def _recover(
        self,
        ctx: RequestContext,
        plan: Plan,
        failed: Deployment,
        failure: Failure,
        started: float,
    ) -> Reply:
        """After the first call failed: the rest of the attempts, or the client's error."""
        assert ctx.model is not None
        deadline = started + self._settings.deadline
        # The budget hold was priced at the name the client sent (an alias: its dearest
        # version), and the key was checked against it.
        course = _Course(plan, self._router, partial(self._may_fall_back, ctx, ctx.model))
        current = plan  # the plan of the failed attempt, then of the next one
        called = {plan.model}
        answer, answer_plan = failure, plan
        down = True  # every call so far failed before reaching an upstream
        while True:
            if failure.next is not Next.BUSY or answer.next is Next.BUSY:
                answer, answer_plan, cause = failure, current, failed
            if failure.next is not Next.BUSY and not failure.unreachable:
                down = False
            if failure.next is Next.ANSWER:
                break
            now = self._clock()
            course.failed(failure, current, failed, now)
            choice = self._choose(ctx, course, now, deadline)
            if choice is None:
                break
            serving, failed, wait = choice
            model = serving.model
            if model not in called:
                called.add(model)
                self._metrics.fallbacks_for(plan.model, answer_plan.model, model, course.kind).inc()
            elif ctx.attempts:
                self._metrics.retries_for(answer_plan.model, cause.id, answer.error.kind).inc()
            if wait > 0:
                await self._sleep(wait)
            # The model that serves is the plan's: charged, recorded and named by it. The
            # body keeps the client's name, which each deployment's call rewrites.
            current = ctx.plan = serving
            ctx.prompt_tokens = ctx.completion_tokens = None
            ctx.content_events = 0
            result = await self._attempt(ctx, failed, self._clock())
            if not isinstance(result, Failure):
                ctx.error_kind = None  # the request succeeded; the failures are in the metrics
                ctx.response_headers = _headers(failed.id, model, ctx.attempts)
                return result
            failure = result
        ctx.plan = answer_plan
        raise self._give_up(ctx, answer, answer_plan.model, cause, down)

    def _choose(
        self, ctx: RequestContext, course: _Course, now: float, deadline: float
    ) -> tuple[Plan, Deployment, float] | None:
        """The next attempt (its model's plan, deployment and the wait before it), within the
        attempt cap, the deadline and the retry budgets; None when there is none."""
        settings = self._settings
        while ctx.attempts < settings.attempts and now < deadline:
            choice = course.next(now, deadline, self._backoff, settings.backoff_max)
            if choice is None:
                return None
            deployment = choice[1]
            if ctx.attempts == 0 or self._budgets.try_withdraw(deployment.id, now):
                return choice
            self._metrics.retry_budget_exhausted_for(deployment.id).inc()
        return None

    def _give_up(
        self,
        ctx: RequestContext,
        answer: Failure,
        model: str,
        deployment: Deployment,
        down: bool,
    ) -> SluiceError:
        """The error the client gets: ``answer``, the failure of ``deployment`` (``model``);
        a 503 when no call reached an upstream (every deployment is down)."""
        error = answer.error
        ctx.error_kind = error.kind
        if ctx.attempts == 0:
            ctx.accepted = False  # load shedding refused every candidate: nothing to charge
        elif down:
            error = ServiceUnavailableError(
                f"No deployment of the model '{model}' could be reached "
                f"({ctx.attempts} attempts); retry later.",
                code="upstream_unreachable",
                headers={"Retry-After": "1"},
            )
        headers = _headers(deployment.id, model, ctx.attempts)
        retried = (
            ctx.attempts
            and self._settings.attempts > 1
            and answer.next in (Next.RETRY, Next.ELSEWHERE)
            and answer.outcome is not Outcome.THROTTLED
        )
        # The gateway has retried already, or the upstream said not to (its own header).
        said_no = isinstance(error, UpstreamStatusError) and error.should_retry is False
        if retried or said_no:
            headers += b"x-should-retry: false\r\n"
        ctx.response_headers = headers
        return error

    def _backoff(self, retry: int) -> float:
        """Full jitter: a random wait up to ``backoff_initial * 2^retry``, capped."""
        settings = self._settings
        cap = min(settings.backoff_max, settings.backoff_initial * 2**retry)
        return self._rng.uniform(0.0, cap)

    def _may_fall_back(self, ctx: RequestContext, held_for: str, model: str) -> bool:
        """May this request go to ``model``: one its key may use and, when it holds part of a
        budget, no dearer per token than ``held_for`` (the hold's worst case stays true)."""
        principal = ctx.principal
        key = principal.key if principal is not None else None
        if key is not None and key.models is not None and model not in key.models:
            return False
        if ctx.budget_hold is not None:
            held = self._prices.get(held_for) or (0.0, 0.0)
            rates = self._prices.get(model) or (0.0, 0.0)
            if rates[0] > held[0] or rates[1] > held[1]:
                return False
        return self._router.knows(model)

    def _served_headers(self, deployment: str, model: str) -> Headers:
        cached = self._first_headers.get(deployment)
        if cached is not None and cached[0] == model:
            return cached[1]
        headers = _headers(deployment, model, 1)
        if len(self._first_headers) >= _MAX_CACHED_HEADERS:
            self._first_headers.clear()
        self._first_headers[deployment] = (model, headers)
        return headers

    def _budget_left(self, deployment: str, balance: float) -> None:
        self._metrics.retry_budget_for(deployment).set(balance)


class _Course:
    """Where a request may still go after a failure: the plan's other candidates, then its
    fallback models' candidates, then again (after a backoff) the deployments whose
    failure was safe to repeat."""

    def __init__(self, plan: Plan, router: Router, allowed: Callable[[str], bool]) -> None:
        self._plan = plan
        self._router = router
        self._allowed = allowed
        self._fresh = deque((plan, d) for d in plan.candidates[1:])
        self._chain = deque(plan.fallbacks)
        self.kind = "generic"
        """The fallback list being followed: generic, context_window or content_policy."""
        self._planned = {plan.model}
        self._again: deque[tuple[Plan, Deployment]] = deque()
        self._until: dict[str, float] = {}  # deployment id -> when its Retry-After ends
        self._backoffs = 0

    def failed(self, failure: Failure, plan: Plan, deployment: Deployment, now: float) -> None:
        step = failure.next
        if step is Next.RETRY:
            self._again.append((plan, deployment))
            if failure.retry_after is not None:
                self._until[deployment.id] = now + failure.retry_after
        elif step is Next.CONTEXT_WINDOW or step is Next.CONTENT_POLICY:
            # The request itself does not suit these models: only that list is left.
            self._fresh.clear()
            self._again.clear()
            first = self._plan
            self._chain = deque(
                first.context_window_fallbacks
                if step is Next.CONTEXT_WINDOW
                else first.content_policy_fallbacks
            )
            self.kind = step.value

    def next(
        self, now: float, deadline: float, backoff: Callable[[int], float], patience: float
    ) -> tuple[Plan, Deployment, float] | None:
        if self._fresh:
            plan, deployment = self._fresh.popleft()
            return plan, deployment, 0.0
        while self._chain:
            model = self._chain.popleft()
            if model in self._planned or not self._allowed(model):
                continue
            self._planned.add(model)
            try:
                plan = self._router.plan(model)
            except KeyError:  # a reload removed it a moment ago
                continue
            self._fresh.extend((plan, d) for d in plan.candidates[1:])
            return plan, plan.candidates[0], 0.0
        while self._again:
            plan, deployment = self._again.popleft()
            held = self._until.pop(deployment.id, now) - now
            if held > patience:
                continue  # it asked for a longer wait than a backoff may be
            wait = max(backoff(self._backoffs), held)
            if now + wait > deadline:
                return None
            self._backoffs += 1
            return plan, deployment, wait
        return None


def _headers(deployment: str, model: str, attempts: int) -> Headers:
    """The ``x-sluice-*`` header lines (names from the configuration, made safe for a
    header all the same)."""
    return b"x-sluice-deployment: %s\r\nx-sluice-model: %s\r\nx-sluice-attempts: %d\r\n" % (
        header_value(deployment),
        header_value(model),
        attempts,
    )


def _give_back_slot(ctx: RequestContext) -> None:
    """The attempt's concurrency slot (`sluice.pipeline.backend`), once it has ended."""
    assert ctx.slot is not None
    ctx.slot.release()
    ctx.slot = None


def _stream_ended(deployment: Deployment, first_byte: float, ctx: RequestContext) -> None:
    deployment.end(Outcome.FAILED if ctx.error_kind is not None else Outcome.OK, first_byte)


def upstream_failed(metrics: GatewayMetrics, ctx: RequestContext, exc: UpstreamError) -> None:
    ctx.error_kind = exc.kind
    metrics.upstream_errors_for(ctx.model or "-", ctx.deployment or "-", exc.kind).inc()
