"""The attempts step against scripted backends, with an injected clock, sleep and rng:
what is retried and what is not, the attempt cap, the deadline, the retry budget, the
fallback lists, streams before and after their first event, and the x-sluice-* headers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.errors import (
    ContextLengthExceededError,
    DeploymentBusyError,
    InvalidRequestError,
    RateLimitError,
    SluiceError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from sluice.keys.store import KeyRecord
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.attempts import Attempts
from sluice.pipeline.auth import Principal
from sluice.pipeline.backend import call_backend
from sluice.pipeline.budgets import BudgetHold
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.steps import compose
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.plan import ModelRoute, Plan
from sluice.routing.router import Router
from sluice.routing.settings import RetrySettings
from sluice.routing.table import Table

OK_BODY = (
    b'{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
)
EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def status(code: int, body: dict[str, Any] | None = None, retry_after: float | None = None) -> Any:
    envelope = {
        "error": {"message": "no", "type": "x", "param": None, "code": None, **(body or {})}
    }
    return UpstreamStatusError(code, orjson.dumps(envelope), retry_after=retry_after)


class Clock:
    """Time that moves only when someone sleeps (or a backend says a call took long)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Scripted:
    """A backend answering from a script: each call takes the next step (then "ok" for
    ever). A step is an exception to raise, "ok", a float (the call takes that long and
    fails with a 502), or for streams "fail-first" / "fail-after-first" / "stall-first"."""

    def __init__(self, name: str, clock: Clock, *script: Any) -> None:
        self.name = name
        self.clock = clock
        self.script = list(script)
        self.calls: list[UpstreamCall] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def _step(self, call: UpstreamCall) -> Any:
        self.calls.append(call)
        step = self.script.pop(0) if self.script else "ok"
        if isinstance(step, float):
            self.clock.now += step
            raise UpstreamStatusError(502, b"slow and broken")
        if isinstance(step, BaseException):
            raise step
        return step

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        self._step(call)
        return UpstreamReply(200, OK_BODY)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        step = self._step(call)

        async def chunks() -> AsyncIterator[bytes]:
            if step == "fail-first":
                raise UpstreamConnectError("reset before the first event", code="upstream_reset")
            if step == "stall-first":
                raise UpstreamTimeoutError("no data", code="upstream_read_timeout")
            yield EVENT
            if step == "fail-after-first":
                raise UpstreamConnectError("broke mid-response", code="upstream_reset")
            yield EVENT + DONE

        yield chunks()


class Recorded(Deployment):
    """A deployment that remembers how its attempts ended."""

    def __init__(self, id: str, backend: Scripted, upstream_model: str | None = None) -> None:
        super().__init__(id, backend, upstream_model or id.split("/")[0], 1.0)
        self.ends: list[tuple[Outcome, float | None, float | None]] = []

    def end(
        self, outcome: Outcome, first_byte_s: float | None, retry_after_s: float | None = None
    ) -> None:
        super().end(outcome, first_byte_s, retry_after_s)
        self.ends.append((outcome, first_byte_s, retry_after_s))

    @property
    def outcomes(self) -> list[Outcome]:
        return [end[0] for end in self.ends]


class World:
    """Models, their deployments and the attempts step in front of `call_backend`."""

    def __init__(self, **retries: Any) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.routes: dict[str, ModelRoute] = {}
        self.settings = RetrySettings(**retries)
        self.prices: dict[str, tuple[float, float]] = {}

    def deployment(self, id: str, *script: Any, upstream_model: str | None = None) -> Recorded:
        return Recorded(id, Scripted(id, self.clock, *script), upstream_model)

    def model(self, name: str, *deployments: Recorded, **fallbacks: list[str]) -> None:
        lists = {key: tuple(value) for key, value in fallbacks.items()}
        self.routes[name] = ModelRoute(name, list(deployments), **lists)

    def handler(self) -> Callable[[RequestContext], Any]:
        router = Router(Table(dict(self.routes)), seed=1)
        self.attempts = Attempts(
            self.metrics,
            router,
            self.settings,
            self.prices,
            clock=self.clock,
            sleep=self.clock.sleep,
            rng=random.Random(7),
        )
        return compose([self.attempts], call_backend)

    def context(self, model: str, *, stream: bool = False) -> RequestContext:
        route = self.routes[model]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        ctx = RequestContext(request_id="r1", started=self.clock.now)
        ctx.upstream_route = "chat/completions"
        ctx.model = model
        ctx.body = body
        ctx.raw = orjson.dumps(body)
        ctx.stream = stream
        ctx.plan = Plan(
            model,
            list(route.deployments),  # in the order given: the balancer's order is B1's
            route.fallbacks,
            route.context_window_fallbacks,
            route.content_policy_fallbacks,
        )
        return ctx

    async def run(self, model: str, **options: Any) -> tuple[RequestContext, Any]:
        handler = self.handler()
        ctx = self.context(model, **options)
        return ctx, await handler(ctx)

    async def fail(self, model: str, **options: Any) -> tuple[RequestContext, SluiceError]:
        handler = self.handler()
        ctx = self.context(model, **options)
        with pytest.raises(SluiceError) as raised:
            await handler(ctx)
        return ctx, raised.value

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def served(ctx: RequestContext) -> str:
    """The model a request is charged and recorded as (`sluice.pipeline.accounting`)."""
    assert ctx.plan is not None
    return ctx.plan.model


def headers(ctx: RequestContext) -> dict[str, str]:
    lines = (ctx.response_headers or b"").decode().split("\r\n")
    return dict(line.split(": ", 1) for line in lines if line)


async def drain(reply: StreamReply, ctx: RequestContext) -> bytes:
    """Relay the stream as the HTTP layer does, then run what waits for its end."""
    out = b""
    try:
        async for data in reply.events:
            out += data
    finally:
        await reply.close()
        for finish in ctx.at_end or ():
            finish(ctx)
    return out


# -- the first call ---------------------------------------------------------------------


async def test_served_at_once() -> None:
    world = World()
    a = world.deployment("m/0")
    world.model("m", a)
    ctx, reply = await world.run("m")
    assert reply.body == OK_BODY
    assert ctx.attempts == 1
    assert headers(ctx) == {
        "x-sluice-deployment": "m/0",
        "x-sluice-model": "m",
        "x-sluice-attempts": "1",
    }
    assert a.outcomes == [Outcome.OK]
    assert a.outstanding == 0
    assert world.clock.sleeps == []


async def test_the_first_attempts_headers_are_built_once_per_deployment() -> None:
    world = World()
    world.model("m", world.deployment("m/0"))
    handler = world.handler()
    first, second = world.context("m"), world.context("m")
    await handler(first)
    await handler(second)
    assert first.response_headers is second.response_headers


# -- what is retried -------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("unreachable"),
        UpstreamConnectError("reset", code="upstream_reset"),
        UpstreamTimeoutError("first byte", code="upstream_read_timeout"),
        UpstreamStatusError(500, b"{}"),
        UpstreamStatusError(503, b"{}"),
        UpstreamStatusError(408, b"{}"),
        UpstreamStatusError(429, b"{}"),
        RateLimitError("engine queue full", code="engine_queue_full"),
    ],
    ids=lambda e: f"{type(e).__name__}-{getattr(e, 'upstream_status', e.code)}",
)
async def test_safe_failures_are_retried_on_the_same_deployment(error: SluiceError) -> None:
    world = World()
    a = world.deployment("m/0", error)
    world.model("m", a)
    ctx, reply = await world.run("m")
    assert reply.body == OK_BODY
    assert ctx.attempts == 2
    assert len(a.backend.calls) == 2
    assert headers(ctx)["x-sluice-attempts"] == "2"
    assert ctx.error_kind is None  # the request succeeded
    assert world.clock.sleeps
    assert world.clock.sleeps[0] <= 0.025
    assert a.outcomes[1] is Outcome.OK


@pytest.mark.parametrize(
    "error",
    [
        UpstreamStatusError(400, b'{"error":{"message":"bad","code":"invalid_value"}}'),
        UpstreamStatusError(404, b"{}"),
        UpstreamStatusError(409, b"{}"),
        UpstreamStatusError(422, b"{}"),
        InvalidRequestError("temperature too hot", param="temperature"),
    ],
    ids=lambda e: str(getattr(e, "upstream_status", e.code)),
)
async def test_the_clients_errors_are_answered_at_once(error: SluiceError) -> None:
    world = World()
    a, b = world.deployment("m/0", error), world.deployment("m/1")
    world.model("m", a, b, fallbacks=["m"])
    ctx, raised = await world.fail("m")
    assert raised is error
    assert ctx.attempts == 1
    assert b.backend.calls == []
    assert a.outcomes == [Outcome.OK]  # the client's fault: not the deployment's
    assert headers(ctx)["x-sluice-attempts"] == "1"
    assert "x-should-retry" not in headers(ctx)


async def test_another_deployment_is_tried_at_once() -> None:
    world = World()
    a, b = world.deployment("m/0", UpstreamConnectError("unreachable")), world.deployment("m/1")
    world.model("m", a, b)
    ctx, _ = await world.run("m")
    assert world.clock.sleeps == []  # a fresh deployment needs no backoff
    assert headers(ctx) == {
        "x-sluice-deployment": "m/1",
        "x-sluice-model": "m",
        "x-sluice-attempts": "2",
    }
    assert a.outcomes == [Outcome.FAILED]
    assert a.ends[0][1] is None  # no first byte came
    assert b.outcomes == [Outcome.OK]
    assert ctx.target is b
    assert (
        world.sample("sluice_retries_total", model="m", deployment="m/0", reason="upstream_connect")
        == 1
    )


async def test_refused_credentials_move_on_and_never_come_back() -> None:
    world = World(attempts=4)
    a = world.deployment("m/0", *[UpstreamAuthError("refused")] * 4)
    b = world.deployment("m/1", *[UpstreamStatusError(502, b"")] * 4)
    world.model("m", a, b)
    _ctx, raised = await world.fail("m")
    assert len(a.backend.calls) == 1
    assert len(b.backend.calls) == 3
    assert isinstance(raised, UpstreamStatusError)
    assert a.outcomes == [Outcome.FAILED]


# -- the cap, the deadline, the backoff, the budget -------------------------------------


async def test_the_attempt_cap_counts_every_call() -> None:
    world = World(attempts=3)
    a = world.deployment("m/0", *[UpstreamStatusError(502, b"")] * 9)
    b = world.deployment("f/0", *[UpstreamStatusError(502, b"")] * 9)
    world.model("m", a, fallbacks=["f"])
    world.model("f", b)
    ctx, raised = await world.fail("m")
    assert len(a.backend.calls) + len(b.backend.calls) == 3
    assert ctx.attempts == 3
    assert isinstance(raised, UpstreamStatusError)
    assert raised.upstream_status == 502
    assert headers(ctx)["x-sluice-attempts"] == "3"
    assert headers(ctx)["x-should-retry"] == "false"  # the gateway did the retrying
    assert world.sample("sluice_upstream_attempts_count") == 1
    assert world.sample("sluice_upstream_attempts_sum") == 3


async def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    world = World(attempts=10, backoff_initial=0.1, backoff_max=0.3, budget_min_per_second=10)
    world.model("m", world.deployment("m/0", *[UpstreamStatusError(500, b"")] * 20))
    await world.fail("m")
    sleeps = world.clock.sleeps
    assert len(sleeps) == 9
    caps = [min(0.3, 0.1 * 2**n) for n in range(9)]
    assert all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
    expected = random.Random(7)
    assert sleeps == [expected.uniform(0, cap) for cap in caps]  # the injected rng's draws


async def test_no_attempt_starts_after_the_deadline() -> None:
    world = World(attempts=10, deadline=30)
    # Each call takes 12 s and fails: 0-12, 12-24, 24-36 (started before 30); no fourth.
    a = world.deployment("m/0", *[12.0] * 10)
    world.model("m", a)
    started = world.clock.now
    _ctx, _ = await world.fail("m")
    assert len(a.backend.calls) == 3
    assert world.clock.now - started < 36 + 1


async def test_a_backoff_never_sleeps_past_the_deadline() -> None:
    world = World(attempts=10, deadline=1.0, backoff_initial=0.4, backoff_max=0.8)
    a = world.deployment("m/0", *[UpstreamStatusError(500, b"")] * 20)
    world.model("m", a)
    started = world.clock.now
    await world.fail("m")
    assert world.clock.now - started <= 1.0


async def test_an_empty_retry_budget_answers_at_once() -> None:
    world = World(budget_ratio=0, budget_min_per_second=0)
    a = world.deployment("m/0", UpstreamStatusError(503, b""))
    world.model("m", a)
    ctx, _raised = await world.fail("m")
    assert len(a.backend.calls) == 1
    assert world.clock.sleeps == []
    assert world.sample("sluice_retry_budget_exhausted_total", deployment="m/0") == 1
    assert headers(ctx)["x-should-retry"] == "false"


async def test_the_budget_grows_with_requests() -> None:
    # 20% of requests, no floor: ten requests pay for two retries.
    world = World(budget_ratio=0.2, budget_min_per_second=0, attempts=2)
    a = world.deployment("m/0", *(["ok"] * 10), *([UpstreamStatusError(503, b""), "ok"] * 3))
    world.model("m", a)
    handler = world.handler()
    for _ in range(10):
        await handler(world.context("m"))
    served = 0
    for _ in range(3):
        ctx = world.context("m")
        try:
            await handler(ctx)
            served += 1
        except UpstreamStatusError:
            pass
    # Three more requests deposited 0.6: the budget had 2.6, so two retries went out.
    assert served == 2
    assert world.sample("sluice_retry_budget_exhausted_total", deployment="m/0") == 1
    assert world.sample("sluice_retry_budget_available", deployment="m/0") < 1


async def test_retry_after_is_waited_for_and_reported() -> None:
    world = World(backoff_max=1.0)
    a = world.deployment("m/0", UpstreamStatusError(429, b"", retry_after=0.5))
    world.model("m", a)
    _ctx, _ = await world.run("m")
    assert world.clock.sleeps[0] >= 0.5
    assert a.ends[0][0] is Outcome.THROTTLED
    assert a.ends[0][2] == 0.5


async def test_a_long_retry_after_is_not_waited_for() -> None:
    world = World(backoff_max=1.0)
    a = world.deployment("m/0", UpstreamStatusError(429, b"", retry_after=5))
    world.model("m", a)
    ctx, raised = await world.fail("m")
    assert world.clock.sleeps == []
    assert len(a.backend.calls) == 1
    assert raised.headers == {"Retry-After": "5"}  # the client learns when to come back
    assert "x-should-retry" not in headers(ctx)


async def test_an_upstream_that_says_not_to_retry_is_called_once_and_so_says_the_answer() -> None:
    world = World(backoff_max=1.0)
    a = world.deployment("m/0", UpstreamStatusError(429, b"", retry_after=0.1, should_retry=False))
    world.model("m", a)
    ctx, _ = await world.fail("m")
    assert len(a.backend.calls) == 1
    assert world.clock.sleeps == []
    assert headers(ctx)["x-should-retry"] == "false"  # nor should the client's SDK


async def test_another_deployment_serves_after_one_says_not_to_retry() -> None:
    world = World()
    a = world.deployment("m/0", UpstreamStatusError(500, b"", should_retry=False))
    b = world.deployment("m/1")
    world.model("m", a, b)
    ctx, _ = await world.run("m")
    assert headers(ctx)["x-sluice-deployment"] == "m/1"
    assert len(a.backend.calls) == 1


async def test_a_throttled_deployment_is_passed_over_for_another() -> None:
    world = World()
    a = world.deployment("m/0", UpstreamStatusError(429, b"", retry_after=30))
    b = world.deployment("m/1")
    world.model("m", a, b)
    ctx, _ = await world.run("m")
    assert world.clock.sleeps == []
    assert headers(ctx)["x-sluice-deployment"] == "m/1"


async def test_every_deployment_down_is_a_503() -> None:
    world = World()
    a = world.deployment("m/0", *[UpstreamConnectError("unreachable")] * 3)
    b = world.deployment(
        "m/1", *[UpstreamTimeoutError("connect", code="upstream_connect_timeout")] * 3
    )
    world.model("m", a, b)
    ctx, raised = await world.fail("m")
    assert raised.http_status == 503
    assert raised.code == "upstream_unreachable"
    assert raised.headers == {"Retry-After": "1"}
    assert ctx.attempts == 3
    assert ctx.error_kind in ("upstream_connect", "upstream_timeout")  # the cause, for the log
    assert headers(ctx)["x-should-retry"] == "false"


async def test_an_upstream_that_answered_is_relayed_not_called_down() -> None:
    world = World()
    a = world.deployment("m/0", *[UpstreamStatusError(500, b"")] * 3)
    b = world.deployment("m/1", *[UpstreamConnectError("unreachable")] * 3)
    world.model("m", a, b)
    _, raised = await world.fail("m")
    assert isinstance(raised, UpstreamStatusError)
    assert raised.upstream_status == 500
    # A stall is not "down" either: the read timeout is what the client gets.
    world = World(attempts=2)
    stalled = UpstreamTimeoutError("no data", code="upstream_read_timeout")
    world.model("m", world.deployment("m/0", stalled, stalled))
    _, raised = await world.fail("m")
    assert raised.http_status == 504


# -- load shedding ---------------------------------------------------------------------


async def test_a_busy_deployment_is_skipped_without_a_call_or_a_retry() -> None:
    world = World(attempts=2, budget_ratio=0, budget_min_per_second=0)
    a = world.deployment("m/0", DeploymentBusyError("full"))
    b = world.deployment("m/1", UpstreamStatusError(500, b""))
    c = world.deployment("m/2")
    world.model("m", a, b, c)
    ctx, raised = await world.fail("m")
    # m/1 was the first call (free); m/2 would be a retry, and the budget is empty.
    assert ctx.attempts == 1
    assert isinstance(raised, UpstreamStatusError)
    assert c.backend.calls == []
    assert a.outcomes == [Outcome.NO_VERDICT]
    assert a.ends[0][1] is None


async def test_every_deployment_busy_is_a_503_and_nothing_is_charged() -> None:
    world = World()
    a = world.deployment("m/0", DeploymentBusyError("full", headers={"Retry-After": "1"}))
    b = world.deployment("m/1", DeploymentBusyError("full", headers={"Retry-After": "2"}))
    world.model("m", a, b)
    ctx, raised = await world.fail("m")
    assert isinstance(raised, DeploymentBusyError)
    assert raised.http_status == 503
    assert ctx.attempts == 0
    assert not ctx.accepted
    assert headers(ctx)["x-sluice-attempts"] == "0"
    assert world.sample("sluice_upstream_attempts_bucket", le="0.0") == 1


# -- fallbacks ------------------------------------------------------------------------


async def test_a_fallback_model_serves_under_its_own_name() -> None:
    world = World()
    a = world.deployment("m/0", *[UpstreamStatusError(503, b"")] * 3)
    f = world.deployment("f/0", upstream_model="f-upstream")
    world.model("m", a, fallbacks=["f"])
    world.model("f", f)
    ctx, _ = await world.run("m")
    assert len(a.backend.calls) == 1  # the fallback before repeating a failed deployment
    assert f.backend.calls[0].body["model"] == "f-upstream"
    assert ctx.plan is not None
    assert ctx.plan.model == "f"  # charged and recorded as the model that served
    assert ctx.model == "m"  # the name the client sent, as the body keeps it
    assert ctx.body["model"] == "m"
    assert headers(ctx) == {
        "x-sluice-deployment": "f/0",
        "x-sluice-model": "f",
        "x-sluice-attempts": "2",
    }
    assert (
        world.sample("sluice_fallbacks_total", model="m", to="f", kind="generic", **{"from": "m"})
        == 1
    )


async def test_back_to_the_requested_model_after_its_fallback_failed() -> None:
    world = World(attempts=3)
    a = world.deployment("m/0", UpstreamStatusError(503, b""))
    f = world.deployment("f/0", UpstreamStatusError(503, b""))
    world.model("m", a, fallbacks=["f"])
    world.model("f", f)
    ctx, _ = await world.run("m")
    assert (len(a.backend.calls), len(f.backend.calls)) == (2, 1)
    assert served(ctx) == "m"
    assert a.backend.calls[1].body["model"] == "m"
    assert headers(ctx)["x-sluice-model"] == "m"


async def test_context_window_failures_use_their_own_list() -> None:
    world = World()
    too_long = status(400, {"code": "context_length_exceeded"})
    a = world.deployment("m/0", too_long)
    a2 = world.deployment("m/1")
    big = world.deployment("big/0")
    other = world.deployment("other/0")
    world.model("m", a, a2, fallbacks=["other"], context_window_fallbacks=["big"])
    world.model("big", big)
    world.model("other", other)
    ctx, _ = await world.run("m")
    assert a2.backend.calls == []
    assert other.backend.calls == []
    assert headers(ctx)["x-sluice-model"] == "big"
    assert a.outcomes == [Outcome.OK]
    assert (
        world.sample(
            "sluice_fallbacks_total", model="m", to="big", kind="context_window", **{"from": "m"}
        )
        == 1
    )


@pytest.mark.parametrize(
    "error",
    [
        ContextLengthExceededError("too long for the embedded model", param="messages"),
        status(400, {"message": "This model's maximum context length is 2048 tokens."}),
        UpstreamStatusError(400, b'{"object":"error","message":"maximum context length is 8"}'),
        status(400, {"type": "exceed_context_size_error"}),
    ],
    ids=["engine", "openai-message", "vllm", "llama.cpp"],
)
async def test_context_window_errors_are_recognised(error: SluiceError) -> None:
    world = World()
    world.model("m", world.deployment("m/0", error), context_window_fallbacks=["big"])
    world.model("big", world.deployment("big/0"))
    ctx, _ = await world.run("m")
    assert served(ctx) == "big"


async def test_without_a_context_window_fallback_the_400_is_relayed() -> None:
    world = World()
    too_long = status(400, {"code": "context_length_exceeded"})
    a = world.deployment("m/0", too_long)
    world.model("m", a, world.deployment("m/1"), fallbacks=["f"])
    world.model("f", world.deployment("f/0"))
    ctx, raised = await world.fail("m")
    assert raised is too_long
    assert ctx.attempts == 1


@pytest.mark.parametrize(
    "error",
    [
        status(400, {"code": "content_policy_violation"}),
        status(400, {"code": "content_filter"}),
        status(400, {"code": None, "innererror": {"code": "ResponsibleAIPolicyViolation"}}),
    ],
    ids=["openai", "azure", "azure-inner"],
)
async def test_content_policy_refusals_use_their_own_list(error: SluiceError) -> None:
    world = World()
    world.model(
        "m", world.deployment("m/0", error), fallbacks=["f"], content_policy_fallbacks=["lenient"]
    )
    world.model("f", world.deployment("f/0"))
    world.model("lenient", world.deployment("lenient/0"))
    ctx, _ = await world.run("m")
    assert served(ctx) == "lenient"


async def test_a_fallback_the_key_may_not_use_is_skipped() -> None:
    world = World()
    world.model("m", world.deployment("m/0", UpstreamStatusError(503, b"")), fallbacks=["f", "g"])
    f, g = world.deployment("f/0"), world.deployment("g/0")
    world.model("f", f)
    world.model("g", g)
    handler = world.handler()
    ctx = world.context("m")
    ctx.principal = Principal(KeyRecord(id="k", key_hash="h", display="sk-…x", models=["m", "g"]))
    await handler(ctx)
    assert f.backend.calls == []
    assert served(ctx) == "g"


async def test_a_budgeted_request_never_falls_back_to_a_dearer_model() -> None:
    world = World(attempts=2)
    world.prices.update({"m": (1.0, 2.0), "dear": (1.0, 3.0), "cheap": (0.5, 1.0)})
    a = world.deployment("m/0", UpstreamStatusError(503, b""), UpstreamStatusError(503, b""))
    world.model("m", a, fallbacks=["dear", "cheap"])
    dear, cheap = world.deployment("dear/0"), world.deployment("cheap/0")
    world.model("dear", dear)
    world.model("cheap", cheap)
    handler = world.handler()
    ctx = world.context("m")
    ctx.budget_hold = BudgetHold("k:lifetime", "r1", 1000)
    await handler(ctx)
    assert dear.backend.calls == []
    assert served(ctx) == "cheap"
    # Without a budget hold the dearer model is fine.
    ctx = world.context("m")
    await handler(ctx)
    assert served(ctx) == "dear"


# -- streams ------------------------------------------------------------------------


async def test_a_stream_that_fails_before_its_first_event_is_retried() -> None:
    world = World()
    a = world.deployment("m/0", "fail-first", "stall-first")
    world.model("m", a)
    ctx, reply = await world.run("m", stream=True)
    assert isinstance(reply, StreamReply)
    assert ctx.attempts == 3
    assert ctx.ttft_seconds is not None
    out = await drain(reply, ctx)
    assert out == EVENT + EVENT + DONE  # the first event, put back in front
    assert a.outcomes == [Outcome.FAILED, Outcome.FAILED, Outcome.OK]


async def test_a_stream_is_never_retried_after_its_first_event() -> None:
    world = World()
    a = world.deployment("m/0", "fail-after-first")
    world.model("m", a)
    ctx, reply = await world.run("m", stream=True)
    assert a.outcomes == []  # open: its end comes with the stream's
    with pytest.raises(UpstreamError, match="mid-response"):
        async for _ in reply.events:
            pass
    ctx.error_kind = "upstream_connect"  # as the HTTP layer records a mid-stream failure
    for finish in ctx.at_end or ():
        finish(ctx)
    await reply.close()
    assert len(a.backend.calls) == 1
    assert ctx.attempts == 1
    assert a.outcomes == [Outcome.FAILED]


async def test_a_stream_falls_back_before_its_first_event() -> None:
    world = World()
    world.model("m", world.deployment("m/0", *["fail-first"] * 3), fallbacks=["f"])
    world.model("f", world.deployment("f/0"))
    ctx, reply = await world.run("m", stream=True)
    assert headers(ctx)["x-sluice-model"] == "f"
    assert await drain(reply, ctx) == EVENT + EVENT + DONE
