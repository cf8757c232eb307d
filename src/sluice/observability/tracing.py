"""OpenTelemetry tracing: a span per request, per pipeline step and per upstream attempt.

Imported only when ``tracing.enabled`` (it needs the ``tracing`` extra); off, nothing here
runs, the pipeline is linked without it (`sluice.pipeline.steps.compose`) and no middleware
or access-log subclass of its own is installed.

    request span (SERVER, `TracedRequests`: parent from the client's ``traceparent``)
      identify → read → admit → plan → cache → attempts   (one span each, nested as the
        attempt (CLIENT, one per upstream call)             steps wrap one another)
          engine.queue, engine.decode   (the embedded model: one pair per sequence,
                                         made when it ends from the times it recorded)

Each attempt sends the upstream a ``traceparent`` (and ``tracestate``) naming its own span
(`RequestContext.trace_headers`), and the access record carries the request's ``trace_id``.
Spans go out over OTLP/HTTP in batches, from the SDK's exporter thread; the provider is
the app's own, never the process-wide global, so apps built side by side stay apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.engine.types import SequenceTiming
from sluice.errors import SluiceError
from sluice.observability.logging import AccessLog
from sluice.observability.tracing_settings import TracingSettings
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.steps import Handler, Reply, Step
from sluice.settings import resolve_url

_STEP_NAMES = {
    "Identify": "identify",
    "ReadRequest": "read",
    "Admit": "admit",
    "MakePlan": "plan",
    "CacheStep": "cache",
    "Attempts": "attempts",
}
# Probes and scrapes would fill the trace store with nothing worth reading.
_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Tracing:
    """The app's tracer provider and what it installs: built at start-up, closed (its last
    spans flushed) when the lifespan ends. ``processor`` replaces the OTLP exporter (tests
    give an in-memory one)."""

    def __init__(self, settings: TracingSettings, processor: SpanProcessor | None = None) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if processor is None:
            headers = {name: resolve_url(value) or "" for name, value in settings.headers.items()}
            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, headers=headers)
            processor = BatchSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer: Tracer = self.provider.get_tracer("sluice")
        self.propagator = TraceContextTextMapPropagator()
        self.sequences = SequenceSpans(self.tracer)
        """The embedded engine's spans (`sluice.engine.types.SequenceTracer`)."""

    def step(self, step: Step) -> Handler:
        name = _STEP_NAMES.get(type(step).__name__, type(step).__name__.lower())
        return _TracedStep(step, f"sluice.{name}", self.tracer)

    def upstream(self, last: Handler) -> Handler:
        return _TracedAttempt(last, self.tracer, self.propagator)

    def middleware(self) -> Middleware:
        """The request span's middleware: outside `ObserveRequests`, so the access record
        is written while the span is current."""
        return Middleware(TracedRequests, tracing=self)

    def access_log(self, enabled: bool, stream: TextIO | None = None) -> AccessLog:
        return TracedAccessLog(enabled, stream)

    def close(self) -> None:
        """Export what is pending and stop the exporter's thread."""
        self.provider.shutdown()


class _TracedStep:
    __slots__ = ("_inner", "_name", "_tracer")

    def __init__(self, inner: Step, name: str, tracer: Tracer) -> None:
        self._inner = inner
        self._name = name
        self._tracer = tracer

    async def __call__(self, ctx: RequestContext) -> Reply:
        # A trace not sampled records nothing: its steps make no spans (a span costs
        # several microseconds even unrecorded).
        if not trace.get_current_span().is_recording():
            return await self._inner(ctx)
        with self._tracer.start_as_current_span(self._name):
            return await self._inner(ctx)


class _TracedAttempt:
    """One upstream call: its span is the ``traceparent`` the upstream receives."""

    __slots__ = ("_inner", "_propagator", "_tracer")

    def __init__(self, inner: Handler, tracer: Tracer, propagator: TraceContextTextMapPropagator):
        self._inner = inner
        self._tracer = tracer
        self._propagator = propagator

    async def __call__(self, ctx: RequestContext) -> Reply:
        if not trace.get_current_span().is_recording():
            # Not sampled: the upstream still joins the trace, under the request's span.
            headers: dict[str, str] = {}
            self._propagator.inject(headers)
            ctx.trace_headers = headers
            return await self._inner(ctx)
        with self._tracer.start_as_current_span("sluice.attempt", kind=SpanKind.CLIENT) as span:
            span.set_attribute("sluice.deployment", ctx.deployment or "")
            # Counted by the attempts step once each call ends: this one is the next.
            span.set_attribute("sluice.attempt", ctx.attempts + 1)
            headers = {}
            self._propagator.inject(headers)
            ctx.trace_headers = headers
            try:
                reply = await self._inner(ctx)
            except SluiceError as error:
                span.set_attribute("sluice.outcome", error.kind)
                raise
            span.set_attribute("sluice.outcome", "ok")
            return reply


class SequenceSpans:
    """An engine sequence's queue wait and decode as two spans under the attempt's.

    The decode thread never touches OpenTelemetry: a sequence notes when it was admitted
    and when its first token came (a float each), and the spans are made on the event loop
    once it ends, with those times (monotonic, moved onto the wall clock)."""

    __slots__ = ("_tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def capture(self) -> object | None:
        if not trace.get_current_span().is_recording():
            return None
        return otel_context.get_current()

    def record(self, parent: object, timing: SequenceTiming) -> None:
        assert isinstance(parent, otel_context.Context)
        shift = time.time_ns() - time.monotonic_ns()

        def wall(seconds: float) -> int:
            return int(seconds * 1e9) + shift

        admitted = timing.admitted or timing.ended  # refused or cancelled while queued
        queue = self._tracer.start_span(
            "sluice.engine.queue", context=parent, start_time=wall(timing.submitted)
        )
        queue.set_attribute("sluice.engine.admitted", bool(timing.admitted))
        queue.end(end_time=wall(admitted))
        if not timing.admitted:
            return
        decode = self._tracer.start_span(
            "sluice.engine.decode", context=parent, start_time=wall(timing.admitted)
        )
        decode.set_attribute("sluice.engine.prompt_tokens", timing.prompt_tokens)
        decode.set_attribute("sluice.engine.reused_tokens", timing.reused_tokens)
        decode.set_attribute("sluice.engine.completion_tokens", timing.completion_tokens)
        if timing.first_token:
            decode.add_event("first_token", timestamp=wall(timing.first_token))
        decode.end(end_time=wall(timing.ended))


class _ScopeHeaders(Getter[Mapping[bytes, bytes]]):
    def get(self, carrier: Mapping[bytes, bytes], key: str) -> list[str] | None:
        value = carrier.get(key.encode("latin-1"))
        return None if value is None else [value.decode("latin-1")]

    def keys(self, carrier: Mapping[bytes, bytes]) -> list[str]:
        return [key.decode("latin-1") for key in carrier]


_GETTER = _ScopeHeaders()


class TracedRequests:
    """ASGI middleware outside `ObserveRequests`: the request's span, child of the client's
    ``traceparent`` when it sent one, current while the request runs (the pipeline's spans
    and the access record find it there) and described from its context at the end."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracer = tracing.tracer
        self.propagator = tracing.propagator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        parent = self.propagator.extract(dict(scope["headers"]), getter=_GETTER)
        method: str = scope["method"]
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            method, context=parent, kind=SpanKind.SERVER
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                span.set_attribute("http.request.method", method)
                span.set_attribute("url.path", scope["path"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                ctx: RequestContext | None = scope.get(SCOPE_KEY)
                if ctx is not None:
                    _describe(span, ctx, method)


def _describe(span: trace.Span, ctx: RequestContext, method: str) -> None:
    span.set_attribute("sluice.request_id", ctx.request_id)
    if ctx.route != "other":
        span.update_name(f"{method} /v1/{ctx.route}")
        span.set_attribute("http.route", f"/v1/{ctx.route}")
    if ctx.model is not None:
        span.set_attribute("sluice.model", ctx.model)
        span.set_attribute("sluice.stream", ctx.stream)
    if ctx.deployment is not None:
        span.set_attribute("sluice.deployment", ctx.deployment)
        span.set_attribute("sluice.attempts", ctx.attempts)
    if ctx.principal is not None:
        # The key's id, never the secret; the master key has none.
        span.set_attribute("sluice.key_id", ctx.principal.key_id or "master")
    if ctx.cache is not None:
        span.set_attribute("sluice.cache", ctx.cache)
    if ctx.error_kind is not None:
        span.set_attribute("error.type", ctx.error_kind)


class TracedAccessLog(AccessLog):
    """The access log with the request's ``trace_id``, read from the current span (the
    request span: records are written while it is current)."""

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            fields["trace_id"] = trace.format_trace_id(span_context.trace_id)
        super().write(fields)
