"""Reading the request: the body (after identification, so a 401 costs no read), its
validation, and the model it names.

The body is read straight from ASGI ``receive`` (no framework request object in between),
refused with 413 past the limit: announced by ``Content-Length`` before a byte is read,
or counted as it arrives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.requests import ClientDisconnect

from sluice.errors import ModelNotFoundError, PayloadTooLargeError
from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import prompt_estimate
from sluice.pipeline.steps import Handler, Reply
from sluice.protocol import parse_json_object, validate


class ReadRequest:
    """Parses and validates the body (400 naming the field) and refuses a model the gateway
    does not serve (404) before anything is reserved for it."""

    next: Handler

    def __init__(self, serves: Callable[[str], bool], max_body_bytes: int) -> None:
        self._serves = serves
        self._max_body = max_body_bytes

    async def __call__(self, ctx: RequestContext) -> Reply:
        receive = ctx.receive
        assert receive is not None
        raw = await read_body(receive, ctx.headers, self._max_body)
        body = parse_json_object(raw)
        route = ctx.route
        model = validate(route, body)  # type: ignore[arg-type]  # a hot route's name
        if not self._serves(model):
            raise model_not_found(model)
        ctx.upstream_route = route  # type: ignore[assignment]
        ctx.model = model
        ctx.body = body
        ctx.raw = raw
        ctx.prompt_estimate = prompt_estimate(len(raw))
        ctx.body_bytes = len(raw)
        ctx.stream = route != "embeddings" and body.get("stream") is True
        if "priority" in body:  # queue order is the key's (the call's priority), not the client's
            del body["priority"]
            ctx.raw = None
        return await self.next(ctx)


async def read_body(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    headers: Sequence[tuple[bytes, bytes]],
    limit: int,
) -> bytes:
    """A request's body from ASGI ``receive``, refused with 413 past ``limit``: announced by
    ``Content-Length`` before a byte is read, or counted as it arrives."""
    for name, value in headers:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise _too_large(limit)
            break
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
        if not message.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")


def model_not_found(model: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        param="model",
    )
