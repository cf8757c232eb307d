"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

The HTTP side of a request only: each route hands the request to the pipeline
(`sluice.pipeline.steps`) with a reader for its body, and sends back what the pipeline
returns: a complete answer as the upstream's bytes, a stream event by event. Errors are
raised from `sluice.errors` and rendered by the app's one handler; a stream that fails
after its first byte ends with an SSE error event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from sluice.api.caller import caller, describe_client
from sluice.errors import UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.attempts import upstream_failed
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.identify import Identify
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.request import model_not_found
from sluice.pipeline.sse import error_event
from sluice.pipeline.steps import Handler

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"


class OpenAIService:
    """Serves the OpenAI surface in front of the router's deployments."""

    def __init__(
        self,
        pipeline: Handler,
        model_names: Callable[[], list[str]],
        metrics: GatewayMetrics,
        identify: Identify | None = None,
    ) -> None:
        """``model_names`` gives the names served now (the router's, which a reload
        replaces with a new list): the listing is rebuilt only when the list changes."""
        self._pipeline = pipeline
        self._metrics = metrics
        self._identify = identify
        self._created = int(time.time())
        self._model_names = model_names
        self._listed: list[str] | None = None
        self._models: list[dict[str, Any]] = []
        self._models_body = b""
        # Plain ASGI endpoints (not request -> response functions): no framework request
        # and response objects, nor their wrapping coroutines, on the hot path.
        self.chat_completions = _Proxy(self, "chat/completions")
        self.completions = _Proxy(self, "completions")
        self.embeddings = _Proxy(self, "embeddings")

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

    async def list_models(self, request: Request) -> Response:
        allowed = await self._allowed_models(request)
        models, body = self._listing()
        if allowed is None:
            return Response(body, media_type=JSON)
        data = [m for m in models if m["id"] in allowed]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        allowed = await self._allowed_models(request)
        if allowed is not None and name not in allowed:
            name = ""  # a model the key may not use does not exist for it
        model = next((m for m in self._listing()[0] if m["id"] == name), None)
        if model is None:
            raise model_not_found(name)
        return Response(orjson.dumps(model), media_type=JSON)

    def _listing(self) -> tuple[list[dict[str, Any]], bytes]:
        """The served models and the ``/v1/models`` body, rebuilt when the names change."""
        names = self._model_names()
        if names is not self._listed:
            created = self._created
            self._models = [
                {"id": name, "object": "model", "created": created, "owned_by": "sluice"}
                for name in names
            ]
            self._models_body = orjson.dumps({"object": "list", "data": self._models})
            self._listed = names
        return self._models, self._models_body

    async def _allowed_models(self, request: Request) -> set[str] | None:
        """The model names the caller may see; None for all."""
        principal = await caller(self._identify, request.scope)
        key = principal.key if principal is not None else None
        return set(key.models) if key is not None and key.models is not None else None

    async def proxy(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext = scope[SCOPE_KEY]
        describe_client(ctx, scope)
        ctx.route = route
        ctx.receive = receive
        reply = await self._pipeline(ctx)
        if isinstance(reply, StreamReply):
            await self._send_stream(ctx, reply, scope, receive, send)
            return
        body = reply.body
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-length", b"%d" % len(body)),
                    (b"content-type", reply.content_type.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _send_stream(
        self, ctx: RequestContext, reply: StreamReply, scope: Scope, receive: Receive, send: Send
    ) -> None:
        events = self._events(ctx, reply)
        response = StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            await response(scope, receive, send)
        finally:
            # However the response ended, the relay's end runs now (the request's state,
            # then the upstream's close, which gives back the deployment's slot): not when
            # the relay is garbage-collected, as it would be after a client that left
            # mid-event (a server may report that by an error that skips a response's
            # background task). Closing twice is safe; one never started is closed here.
            await events.aclose()
            await reply.close()

    async def _events(self, ctx: RequestContext, reply: StreamReply) -> AsyncGenerator[bytes]:
        ended = False
        try:
            async for data in reply.events:
                yield data
            ended = True
        except UpstreamError as exc:
            ended = True
            upstream_failed(self._metrics, ctx, exc)
            yield error_event(exc)
        finally:
            ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
            ctx.client_disconnected = not ended
            await reply.close()


class _Proxy:
    """One hot route as an ASGI app (Starlette routes a callable object to it as such)."""

    def __init__(self, service: OpenAIService, route: str) -> None:
        self._service = service
        self._route = route

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self._service.proxy(self._route, scope, receive, send)
