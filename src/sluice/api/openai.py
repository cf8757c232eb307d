"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Every route reads the raw body, validates what the gateway needs (`sluice.protocol`),
routes the model to a deployment and hands the backend the client's own bytes whenever
nothing had to change. Non-streaming answers go back as the upstream's bytes; streams are
relayed event by event (`sluice.api.sse`). Errors are raised from `sluice.errors` and
rendered by the app's one handler.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import orjson
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from sluice.api.context import SCOPE_KEY, RequestContext
from sluice.api.sse import error_event, relay_events
from sluice.api.usage import read_body_usage
from sluice.backends.base import Route, UpstreamCall
from sluice.errors import PayloadTooLargeError, UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.costs import prompt_estimate
from sluice.pipeline.guard import Guard, admitted
from sluice.protocol import parse_json_object, validate, wants_usage
from sluice.routing.router import Deployment, Router

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"


class OpenAIService:
    """Serves the OpenAI surface in front of the router's deployments."""

    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        max_body_bytes: int,
        guard: Guard | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._guard = guard
        created = int(time.time())
        self._models = [
            {"id": name, "object": "model", "created": created, "owned_by": "sluice"}
            for name in router.model_names
        ]
        self._models_body = orjson.dumps({"object": "list", "data": self._models})

    def routes(self) -> list[HttpRoute]:
        routes: list[HttpRoute] = []
        for prefix in ("/v1", ""):
            routes += [
                HttpRoute(f"{prefix}/chat/completions", self.chat_completions, methods=["POST"]),
                HttpRoute(f"{prefix}/completions", self.completions, methods=["POST"]),
                HttpRoute(f"{prefix}/embeddings", self.embeddings, methods=["POST"]),
                HttpRoute(f"{prefix}/models", self.list_models, methods=["GET"]),
                HttpRoute(f"{prefix}/models/{{model:path}}", self.get_model, methods=["GET"]),
            ]
        return routes

    async def chat_completions(self, request: Request) -> Response:
        return await self._proxy(request, "chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._proxy(request, "completions")

    async def embeddings(self, request: Request) -> Response:
        return await self._proxy(request, "embeddings")

    async def list_models(self, request: Request) -> Response:
        allowed = await self._allowed_models(request)
        if allowed is None:
            return Response(self._models_body, media_type=JSON)
        data = [m for m in self._models if m["id"] in allowed]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        allowed = await self._allowed_models(request)
        if allowed is not None and name not in allowed:
            name = ""  # a model the key may not use does not exist for it
        self._router.route(name)  # raises the 404 for an unknown model
        model = next(m for m in self._models if m["id"] == name)
        return Response(orjson.dumps(model), media_type=JSON)

    async def _allowed_models(self, request: Request) -> set[str] | None:
        """The model names the caller may see; None for all."""
        if self._guard is None:
            return None
        ctx: RequestContext = request.scope[SCOPE_KEY]
        scope = request.scope
        await self._guard.identify(
            ctx, scope["headers"], scope["query_string"], scope.get("client")
        )
        key = ctx.principal.key if ctx.principal is not None else None
        return set(key.models) if key is not None and key.models is not None else None

    async def _proxy(self, request: Request, route: Route) -> Response:
        ctx: RequestContext = request.scope[SCOPE_KEY]
        guard = self._guard
        if guard is not None:
            scope = request.scope
            if not guard.recognise(ctx, scope["headers"], scope["query_string"]):
                await guard.identify(
                    ctx, scope["headers"], scope["query_string"], scope.get("client")
                )
        raw = await self._read_body(request)
        body = parse_json_object(raw)
        model = validate(route, body)
        deployment = self._router.route(model)
        ctx.model = model
        ctx.deployment = deployment.id
        ctx.prompt_estimate = prompt_estimate(len(raw))
        ctx.body_bytes = len(raw)
        forward: bytes | None = raw
        if guard is not None:
            waiting = guard.admit(ctx, model, body, len(raw))
            if waiting is not None:
                admitted(ctx, await waiting)
            reserving = guard.reserve_budget(ctx, model, body, len(raw))
            if reserving is not None and await reserving:
                forward = None  # the body now carries the completion ceiling its hold assumed
        ctx.accepted = True

        if "priority" in body:  # queue order is the key's (the call's priority), not the client's
            del body["priority"]
            forward = None
        if deployment.upstream_model != model:
            body["model"] = deployment.upstream_model
            forward = None
        stream = route != "embeddings" and body.get("stream") is True
        strip_usage = False
        if stream and deployment.stream_usage and not wants_usage(body):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            forward, strip_usage = None, True
        ctx.stream = stream
        call = UpstreamCall(route, body, forward, ctx.request_id, stream)
        if ctx.principal is not None and ctx.principal.key is not None:
            call.priority = ctx.principal.key.priority  # the key's, never the body's
        if stream:
            return await self._stream(ctx, deployment, call, strip_usage)

        started = time.perf_counter()
        try:
            reply = await deployment.backend.send(call)
        except UpstreamError as exc:
            self._upstream_failed(ctx, exc)
            raise
        finally:
            ctx.upstream_seconds = time.perf_counter() - started
        read_body_usage(reply.body, ctx)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    async def _stream(
        self, ctx: RequestContext, deployment: Deployment, call: UpstreamCall, strip_usage: bool
    ) -> Response:
        stack = AsyncExitStack()
        started = time.perf_counter()
        try:
            chunks = await stack.enter_async_context(deployment.backend.stream(call))
        except UpstreamError as exc:
            ctx.upstream_seconds = time.perf_counter() - started
            self._upstream_failed(ctx, exc)
            await stack.aclose()
            raise

        async def events() -> AsyncIterator[bytes]:
            ended = False
            try:
                async for data in relay_events(chunks, ctx, strip_usage=strip_usage):
                    yield data
                ended = True
            except UpstreamError as exc:
                ended = True
                self._upstream_failed(ctx, exc)
                yield error_event(exc)
            finally:
                ctx.upstream_seconds = time.perf_counter() - started
                ctx.client_disconnected = not ended
                await stack.aclose()

        # The background task closes the upstream even if the body never started.
        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(stack.aclose),
        )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past the limit (straight from ASGI ``receive``)."""
        for name, value in request.scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self._max_body:
                    raise PayloadTooLargeError(self._too_large())
                break
        parts: list[bytes] = []
        size = 0
        while True:
            message = await request.receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            part = message.get("body", b"")
            size += len(part)
            if size > self._max_body:
                raise PayloadTooLargeError(self._too_large())
            parts.append(part)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _too_large(self) -> str:
        return f"The request body is larger than the limit of {self._max_body} bytes."

    def _upstream_failed(self, ctx: RequestContext, exc: UpstreamError) -> None:
        ctx.error_kind = exc.kind
        self._metrics.upstream_errors_for(ctx.model or "-", ctx.deployment or "-", exc.kind).inc()
