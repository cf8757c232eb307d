"""Pure ASGI middleware around every request: id, draining, metrics and the access log.

It is the outermost layer of Sluice's own code: it gives each request its id (always made
by the server: it keys the usage record and the parallel slot), keeps the client's
well-formed ``X-Request-ID`` beside it for correlation and echoes that back (or the
server's id when the client sent none) with the key's ``x-ratelimit-*`` headers and the
``x-sluice-*`` headers of the attempts and the cache (`RequestContext.response_headers`,
``cache``), refuses
new work with 503 once the lifespan shuts down (after the drain) and, at the door, a Host not served
or a body that is not JSON (`sluice.api.edge`), and after the last byte (or the
client's departure) records latency, upstream time, gateway overhead, TTFT and tokens,
runs what the pipeline's steps left for the end (a stream's settlement, `RequestContext.at_end`),
writes one access record, and hands the request to accounting (its usage record).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.edge import EdgeChecks
from sluice.api.errors import send_error
from sluice.errors import ServiceUnavailableError, SluiceError
from sluice.http_protocol import HEADER_BLOCK, header_pairs
from sluice.lifecycle import Lifecycle
from sluice.observability.logging import AccessLog
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.accounting import Accounting
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.limits.headers import ratelimit_header_block

_API_ROUTES = {
    f"{prefix}/{route}": route
    for prefix in ("/v1", "")
    for route in ("chat/completions", "completions", "embeddings", "models")
}
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Probes come by address (a kubelet's Host is the pod's IP, Docker's HEALTHCHECK says
# 127.0.0.1) and their answers tell a rebinding page nothing: no Host check on them.
# /metrics keeps it (model names and traffic); scrape server.metrics_port instead.
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_CACHE_HEADERS = {
    result: b"x-sluice-cache: %s\r\n" % result.encode()
    for result in ("hit", "semantic-hit", "coalesced", "miss", "bypass")
}
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    """A server-made request id: 128 random bits. It keys the usage record and the
    limiter's parallel slot, so nobody may choose it or guess another request's."""
    return os.urandom(16).hex()


def client_request_id(value: bytes | None) -> str | None:
    """The client's ``X-Request-ID`` when well formed: kept for correlation and echoed
    back, never used as a key."""
    if value is None:
        return None
    text = value.decode("latin-1")
    return text if _VALID_ID.fullmatch(text) else None


class ObserveRequests:
    def __init__(
        self,
        app: ASGIApp,
        lifecycle: Lifecycle,
        metrics: GatewayMetrics,
        access_log: AccessLog,
        accounting: Accounting | None = None,
        edge: EdgeChecks | None = None,
    ) -> None:
        self.app = app
        self.edge = edge
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.access_log = access_log
        self.accounting = accounting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # One C-level pass over the headers for everything read here (cheaper than
        # comparing names in a Python loop, once per header looked for).
        headers = dict(scope["headers"])
        ctx = RequestContext(
            request_id=new_request_id(),
            started=time.perf_counter(),
            route=_API_ROUTES.get(path, "other"),
            client_request_id=client_request_id(headers.get(b"x-request-id")),
            created_us=time.time_ns() // 1000,
        )
        scope[SCOPE_KEY] = ctx
        id_header = (b"x-request-id", (ctx.client_request_id or ctx.request_id).encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), id_header]
                # x-sluice-* (which deployment served) and x-ratelimit-*, as header lines:
                # a server with Sluice's header-block extension takes them ready-made
                # (sluice.http_protocol), any other as ordinary headers.
                block = ctx.response_headers
                if ctx.cache is not None:
                    cache = _CACHE_HEADERS[ctx.cache]
                    block = cache if block is None else block + cache
                if ctx.admission is not None:
                    limits = ratelimit_header_block(ctx.admission)
                    block = limits if block is None else block + limits
                if block:
                    if HEADER_BLOCK in (scope.get("extensions") or ()):
                        message[HEADER_BLOCK] = block
                    else:
                        header_pairs(block, headers)
                message["headers"] = headers
            await send(message)

        error: SluiceError | None = None
        if not self.lifecycle.accepting and path not in _QUIET_PATHS:
            error = ServiceUnavailableError(
                "The server is shutting down; retry on another replica."
            )
        elif self.edge is not None and path not in _PROBE_PATHS:
            error = self.edge.refusal(scope["method"], headers, path)
        if error is not None:
            # Closing spares the server reading a body nobody will use.
            await send_error(send_with_id, error, close=True)
            ctx.error_kind = error.kind
            self._record(ctx, path, status, time.perf_counter() - ctx.started)
            return

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - ctx.started
            if ctx.at_end is not None:
                for finish in ctx.at_end:
                    finish(ctx)
            self._record(ctx, path, status, elapsed)
            if self.accounting is not None:
                self.accounting.finish(ctx, status, elapsed)

    def _record(self, ctx: RequestContext, path: str, status: int, elapsed: float) -> None:
        model = ctx.model or "-"
        m = self.metrics
        if ctx.route != "other":
            m.requests_for(model, ctx.route, str(status)).inc()
            m.latency_for(model, ctx.route).observe(elapsed)
            if ctx.error_kind is not None:
                m.request_errors_for(model, ctx.error_kind).inc()
        if ctx.deployment is not None:
            m.upstream_latency_for(model, ctx.deployment).observe(ctx.upstream_seconds)
            m.overhead_for(ctx.route).observe(max(elapsed - ctx.upstream_seconds, 0.0))
        if ctx.ttft_seconds is not None:
            m.ttft_for(model).observe(ctx.ttft_seconds)
        if ctx.prompt_tokens:
            m.tokens_for(model, "prompt").inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            m.tokens_for(model, "completion").inc(ctx.completion_tokens)
        if path in _QUIET_PATHS and status < 400:
            return
        record: dict[str, Any] = {
            "request_id": ctx.request_id,
            "path": path,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if ctx.client_request_id is not None:
            record["client_request_id"] = ctx.client_request_id
        if ctx.model is not None:
            record["model"] = ctx.model
            record["deployment"] = ctx.deployment
            record["stream"] = ctx.stream
            record["upstream_ms"] = round(ctx.upstream_seconds * 1000, 3)
            record["prompt_tokens"] = ctx.prompt_tokens
            record["completion_tokens"] = ctx.completion_tokens
        if ctx.ttft_seconds is not None:
            record["ttft_ms"] = round(ctx.ttft_seconds * 1000, 3)
        if ctx.cache is not None:
            record["cache"] = ctx.cache
        if ctx.error_kind is not None:
            record["error"] = ctx.error_kind
        if ctx.client_disconnected:
            record["client_disconnected"] = True
        if ctx.principal is not None:
            record["key_id"] = ctx.principal.key_id or "master"
        self.access_log.write(record)
