"""The cache step: answer from a stored answer, or share an identical request's upstream
call, or go upstream and store what comes back.

It runs after the plan step: the key holds the model that serves (an alias's version), and
a hit still passed authentication and admission (its RPM counts; its tokens are not charged
against TPM, and it costs nothing: `sluice.pipeline.accounting`). What it did is on the
response (``x-sluice-cache``) and in the usage record (``cache_hit``):

    hit           a stored answer, exact match
    semantic-hit  a stored answer to a prompt of the same meaning (`sluice.cache.semantic`)
    coalesced     the answer of an identical request that was in flight (`sluice.cache.flight`)
    miss          answered upstream (and stored, when it may be)
    bypass        not a request the cache serves (not deterministic, or a model without it)

Only deterministic requests are served and stored by default: embeddings, and completions
with temperature 0 or a seed; a request opts in with ``max-age`` (`sluice.cache.controls`).
An answer is stored when it is whole and the model asked for served it (not a fallback),
and, unless configured, when it is not an error, not cut by ``max_tokens`` and calls no
tools.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sluice.backends.base import UpstreamReply
from sluice.cache.answer import Answer, body_to_events, stream_to_body, traits, usage_event
from sluice.cache.controls import NONE, Controls, read_controls
from sluice.cache.flight import MAX_ROUNDS, Flight, Streaming, Watch, shared_failure
from sluice.cache.key import request_key, scope_of, tag
from sluice.cache.metrics import CacheMetrics
from sluice.cache.semantic import Remember, SemanticCache
from sluice.cache.settings import CacheSettings
from sluice.cache.tiers import AnswerStore, Location
from sluice.errors import SluiceError
from sluice.pipeline.context import RequestContext
from sluice.pipeline.headers import header_value
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.sse import DONE
from sluice.pipeline.steps import Handler, Reply
from sluice.protocol import wants_usage

log = logging.getLogger("sluice.cache")
_CACHED_ROUTES = frozenset({"chat/completions", "completions", "embeddings"})
_TOOL_REASONS = frozenset({"tool_calls", "function_call"})
_END = b"\n\n"
_MAX_CACHED_HEADERS = 4096


@dataclass(slots=True, frozen=True)
class ModelPolicy:
    """How a served model is cached (``cache:`` merged with the model's own)."""

    ttl: float
    semantic: bool


@dataclass(slots=True)
class _Pending:
    """A request on its way upstream: where its answer is to be stored, and how."""

    location: Location
    controls: Controls
    ttl: float
    remember: Remember | None = None
    prompt: str | None = None


class CacheStep:
    next: Handler

    def __init__(
        self,
        settings: CacheSettings,
        policies: dict[str, ModelPolicy],
        store: AnswerStore,
        metrics: CacheMetrics,
        semantic: SemanticCache | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._policies = policies  # served model -> policy; a reload replaces its contents
        self._store = store
        self._metrics = metrics
        self._semantic = semantic
        self._clock = clock
        self._flights: dict[str, Flight] = {}
        self._headers: dict[str, bytes] = {}

    def __call__(self, ctx: RequestContext) -> Awaitable[Reply]:
        plan = ctx.plan
        assert plan is not None
        body = ctx.body
        field = body.pop("cache", None)
        if field is not None:
            ctx.raw = None  # the gateway's own field never goes upstream
        controls = self._controls(ctx, field)  # a malformed field is a 400 for every model
        policy = self._policies.get(plan.model)
        if policy is None or ctx.route not in _CACHED_ROUTES:
            return self.next(ctx)
        if not self._cacheable(ctx, body, controls):
            ctx.cache = "bypass"
            self._metrics.result(plan.model, "bypass")
            return self.next(ctx)
        namespace = self._namespace(ctx)
        key = request_key(namespace, ctx.route, plan.model, body)
        location = Location(tag(namespace), tag(plan.model), key)
        ttl = policy.ttl
        if controls.max_age:
            ttl = min(float(controls.max_age), self._settings.max_ttl)
        pending = _Pending(location, controls, ttl)
        if not controls.no_cache:
            answer = self._store.get_now(location.name)
            if answer is not None and self._fresh(answer, controls):
                return self._serve(ctx, answer, "hit")
        semantic = self._semantic if self._semantic_wanted(ctx, policy) else None
        if self._store.redis is None and semantic is None:
            # Nothing more to look in: straight upstream, with no coroutine of the lookup's
            # around the call (each one is passed through at every wait of the upstream).
            return self._upstream(ctx, pending)
        return self._look_further(ctx, pending, namespace, semantic)

    async def _look_further(
        self,
        ctx: RequestContext,
        pending: _Pending,
        namespace: str,
        semantic: SemanticCache | None,
    ) -> Reply:
        """The Redis tier, then the semantic index, then upstream (leading or following)."""
        controls = pending.controls
        assert ctx.plan is not None
        model = ctx.plan.model
        if not controls.no_cache:
            answer = await self._store.get_shared(pending.location)
            if answer is not None and self._fresh(answer, controls):
                return await self._serve(ctx, answer, "hit")
        if semantic is not None:
            scoped = scope_of(namespace, ctx.route, model, ctx.body)
            if scoped is not None:
                scope, text = scoped
                pending.prompt = text
                found, pending.remember = await semantic.lookup(
                    scope, text, pending.location.namespace_tag, pending.location.model_tag
                )
                if found is not None and not controls.no_cache:
                    answer, similarity = found
                    if self._fresh(answer, controls):
                        self._metrics.similarity.observe(similarity)
                        return await self._serve(ctx, answer, "semantic-hit")
        return await self._upstream(ctx, pending)

    def _upstream(self, ctx: RequestContext, pending: _Pending) -> Awaitable[Reply]:
        """Lead the call (the leader's coroutine is the only one around it), or follow an
        identical request's."""
        if not self._settings.coalesce or pending.controls.no_cache:
            # no-cache asks for an answer of its own: not one begun before it arrived.
            return self._lead(ctx, pending, None)
        key = pending.location.key
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = Flight(key)
            return self._lead(ctx, pending, flight)
        return self._follow(ctx, pending, flight)

    async def _follow(self, ctx: RequestContext, pending: _Pending, flight: Flight) -> Reply:
        key = pending.location.key
        for round_ in range(MAX_ROUNDS):
            if round_:
                found = self._flights.get(key)
                if found is None:
                    flight = self._flights[key] = Flight(key)
                    return await self._lead(ctx, pending, flight)
                flight = found
            # A stream is watched as it arrives; a complete answer is needed whole (and
            # the follower waiting for it keeps the leader's stream going).
            if ctx.stream:
                await flight.started()
            else:
                flight.waiters += 1
                try:
                    await flight.ended()
                finally:
                    flight.waiters -= 1
            if flight.alone:
                return await self._lead(ctx, pending, None)
            stream = flight.stream
            if ctx.stream and stream is not None and not stream.done:
                return self._watch(ctx, stream)
            if flight.answer is not None:
                return await self._serve(ctx, flight.answer, "coalesced")
            if not flight.retryable:
                break
        assert flight.error is not None
        raise flight.error.with_traceback(None)  # one error object, many followers

    async def _lead(self, ctx: RequestContext, pending: _Pending, flight: Flight | None) -> Reply:
        assert ctx.plan is not None
        ctx.cache = "miss"
        self._metrics.result(ctx.plan.model, "miss")
        try:
            reply = await self.next(ctx)
        except BaseException as exc:
            self._land(flight)
            if flight is not None:
                flight.fail(exc)
            if isinstance(exc, SluiceError) and shared_failure(exc) and self._settings.store_errors:
                self._keep(ctx, pending, _error_answer(exc, pending, self._clock()))
            raise
        if tag(ctx.plan.model) != pending.location.model_tag:
            # A fallback model answered, under this request's key's checks: neither stored
            # nor handed to followers, who may not be allowed that model.
            self._metrics.skipped("fallback")
            self._land(flight)
            if flight is not None:
                flight.unshared()
            return reply
        if isinstance(reply, StreamReply):
            stream = Streaming(
                reply,
                partial(self._stream_ended, ctx, pending, flight),
                partial(_tokens, ctx),
                (lambda: flight.waiters) if flight is not None else (lambda: 0),
            )
            if flight is not None:
                flight.streaming(stream)
            watch = Watch(stream, include_usage=wants_usage(ctx.body), leader=True)
            return StreamReply(watch, watch.close)
        answer = Answer(
            status=reply.status,
            body=reply.body,
            events=None,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            stored_at=self._clock(),
            content_type=reply.content_type,
            prompt=pending.prompt,
        )
        try:
            self._keep(ctx, pending, answer)
        finally:
            self._land(flight)
            if flight is not None:
                flight.resolve(answer)
        return reply

    def _stream_ended(
        self, ctx: RequestContext, pending: _Pending, flight: Flight | None, stream: Streaming
    ) -> None:
        try:
            if stream.complete:
                answer = Answer.from_stream(
                    stream.events,
                    ctx.prompt_tokens,
                    ctx.completion_tokens,
                    pending.prompt,
                    self._clock(),
                )
                try:
                    self._keep(ctx, pending, answer)
                finally:
                    if flight is not None:
                        flight.resolve(answer)
            elif flight is not None:
                flight.fail(stream.error or RuntimeError("the stream ended early"))
        finally:
            self._land(flight)

    def _land(self, flight: Flight | None) -> None:
        """Take the flight off the board: requests from now on lead or hit the store."""
        if flight is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _keep(self, ctx: RequestContext, pending: _Pending, answer: Answer) -> None:
        """Store ``answer`` when it may be (`_refusal` says why not). Storing is best
        effort: a failure here is counted and logged, never the request's."""
        try:
            reason = self._refusal(ctx, pending, answer)
            if reason is not None:
                self._metrics.skipped(reason)
                return
            stored = answer._replace(expires_at=answer.stored_at + pending.ttl)
            self._store.put(pending.location, stored)
            if pending.remember is not None and self._semantic is not None:
                self._semantic.remember(pending.remember, pending.location, pending.ttl)
        except Exception:
            self._metrics.skipped("store_failed")
            log.exception("an answer could not be stored")

    def _refusal(self, ctx: RequestContext, pending: _Pending, answer: Answer) -> str | None:
        settings = self._settings
        if pending.controls.no_store:
            return "no_store"
        assert ctx.plan is not None
        if pending.location.model_tag != tag(ctx.plan.model):
            return "fallback"  # another model answered: not what this key stands for
        if answer.status != 200:
            return None if settings.store_errors else "error"
        if answer.size > settings.max_entry_bytes:
            return "too_large"
        if ctx.route == "embeddings":
            return None
        reasons, calls_tools = traits(answer)
        if "unreadable" in reasons:
            return "unreadable"
        if "length" in reasons and not settings.store_truncated:
            return "truncated"
        if (calls_tools or reasons & _TOOL_REASONS) and not settings.store_tool_calls:
            return "tool_calls"
        return None

    def _serve(self, ctx: RequestContext, answer: Answer, how: str) -> Awaitable[Reply]:
        """Answer ``ctx`` from ``answer`` in the form it asked for."""
        self._served(ctx, how)
        ctx.prompt_tokens = answer.prompt_tokens
        ctx.completion_tokens = answer.completion_tokens
        reply: Reply
        if answer.status != 200 or not ctx.stream:
            body = answer.body if answer.body is not None else stream_to_body(answer, ctx.route)
            reply = UpstreamReply(answer.status, body, answer.content_type)
        else:
            reply = StreamReply(_once(self._replay(ctx, answer)), _nothing)
        return _ready(reply)

    def _replay(self, ctx: RequestContext, answer: Answer) -> bytes:
        events = answer.events if answer.events is not None else body_to_events(answer, ctx.route)
        data = _END.join(events) + _END if events else b""
        if wants_usage(ctx.body):
            first = events[0] if events else None
            data += usage_event(first, answer.prompt_tokens, answer.completion_tokens) + _END
        ctx.content_events = len(events)
        return data + DONE

    def _watch(self, ctx: RequestContext, stream: Streaming) -> Reply:
        """Follow a stream under way; its counts, known at its end, go on this request's
        usage record."""
        self._served(ctx, "coalesced")
        ctx.then_at_end(partial(_count_from, stream))
        watch = Watch(stream, include_usage=wants_usage(ctx.body), leader=False)
        return StreamReply(watch, watch.close)

    def _served(self, ctx: RequestContext, how: str) -> None:
        """``ctx`` is answered without an upstream call of its own: recorded (at no cost),
        counted, and its response names the model."""
        assert ctx.plan is not None
        ctx.cache = how
        ctx.cache_hit = ctx.accepted = True
        ctx.response_headers = self._model_header(ctx.plan.model)
        self._metrics.result(ctx.plan.model, how)

    def _model_header(self, model: str) -> bytes:
        header = self._headers.get(model)
        if header is None:
            if len(self._headers) >= _MAX_CACHED_HEADERS:
                self._headers.clear()
            header = self._headers[model] = b"x-sluice-model: %s\r\n" % header_value(model)
        return header

    def _controls(self, ctx: RequestContext, field: Any) -> Controls:
        if not self._settings.controls:
            return NONE
        principal = ctx.principal
        key = principal.key if principal is not None else None
        if key is not None and not key.cache_controls:
            return NONE
        header = None
        for name, value in ctx.headers:
            if name == b"cache-control":
                header = value
                break
        if header is None and field is None:
            return NONE
        return read_controls(header, field)

    def _cacheable(self, ctx: RequestContext, body: dict[str, Any], controls: Controls) -> bool:
        if controls.max_age == 0:
            return False  # nothing stored is young enough, and nothing may be kept
        if ctx.route == "embeddings" or not self._settings.deterministic_only:
            return True
        if controls.max_age:
            return True
        temperature = body.get("temperature")
        if (type(temperature) is int or type(temperature) is float) and temperature == 0:
            return True
        return type(body.get("seed")) is int

    def _namespace(self, ctx: RequestContext) -> str:
        """Whose answers this request may be served (`CacheSettings.namespace`)."""
        principal = ctx.principal
        if principal is None:
            return "public"  # no keys at all: every caller is the same anonymous one
        key = principal.key
        scope = self._settings.namespace
        if scope == "global":
            return "global"
        if key is None:
            return "master"
        if scope == "team" and key.team:
            return f"team:{key.team}"
        return f"key:{key.id}"

    def _semantic_wanted(self, ctx: RequestContext, policy: ModelPolicy) -> bool:
        if self._semantic is None or ctx.route != "chat/completions":
            return False
        principal = ctx.principal
        key = principal.key if principal is not None else None
        if key is not None and key.semantic_cache is not None:
            return key.semantic_cache
        return policy.semantic

    def _fresh(self, answer: Answer, controls: Controls) -> bool:
        if controls.max_age is None:
            return True
        return self._clock() - answer.stored_at <= controls.max_age


def _error_answer(error: SluiceError, pending: _Pending, now: float) -> Answer:
    """An upstream's refusal of the request, to store (``store_errors``)."""
    return Answer(error.http_status, error.body(), None, None, None, now, prompt=pending.prompt)


def _tokens(ctx: RequestContext) -> tuple[int | None, int | None]:
    return ctx.prompt_tokens, ctx.completion_tokens


def _count_from(stream: Streaming, ctx: RequestContext) -> None:
    ctx.prompt_tokens, ctx.completion_tokens = stream.tokens()


async def _ready(reply: Reply) -> Reply:
    return reply


async def _nothing() -> None:
    return None


class _once:
    """An async iterator over one ready byte string (a stored stream, sent in one write:
    its events are still separate SSE events)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _once:
        return self

    async def __anext__(self) -> bytes:
        data = self._data
        if data is None:
            raise StopAsyncIteration
        self._data = None
        return data
