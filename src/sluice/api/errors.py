"""The one place that turns exceptions into OpenAI's error envelope.

`SluiceError` subclasses render themselves; Starlette's routing errors (unknown route,
wrong method) and FastAPI's validation errors are mapped onto the same envelope; anything
else becomes a 500 whose body says nothing about the failure, while the traceback goes to
the error log with the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ExceptionHandler, Send

from sluice.errors import InvalidRequestError, NotFoundError, SluiceError
from sluice.pipeline.context import SCOPE_KEY, RequestContext

log = logging.getLogger("sluice.error")


class MethodNotAllowedError(SluiceError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


async def send_error(send: Send, error: SluiceError, *, close: bool = False) -> None:
    """Answer with ``error``'s envelope straight from ASGI middleware (no body read)."""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def render(error: SluiceError) -> Response:
    return Response(
        error.body(),
        status_code=error.http_status,
        media_type="application/json",
        headers=error.headers or None,
    )


async def sluice_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SluiceError)
    ctx: RequestContext | None = request.scope.get(SCOPE_KEY)
    if ctx is not None and ctx.error_kind is None:
        ctx.error_kind = exc.kind
    return render(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: SluiceError = NotFoundError(f"Unknown route: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowedError(f"Method {request.method} is not allowed on this route.")
    else:
        error = SluiceError(str(exc.detail))
        return Response(error.body(), status_code=exc.status_code, media_type="application/json")
    return render(error)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return render(InvalidRequestError(f"{param or 'body'}: {first['msg']}", param=param))


async def client_disconnect(request: Request, exc: Exception) -> Response:
    """The client left while its body was being read: nobody to answer, nothing to log."""
    ctx: RequestContext | None = request.scope.get(SCOPE_KEY)
    if ctx is not None:
        ctx.client_disconnected = True
        ctx.error_kind = "client_disconnected"
    return Response(status_code=499)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    ctx: RequestContext | None = request.scope.get(SCOPE_KEY)
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"request_id": ctx.request_id if ctx else None, "path": request.url.path},
    )
    if ctx is not None:
        ctx.error_kind = "internal"
    return render(SluiceError("The server had an error while processing your request."))


ERROR_HANDLERS: dict[Any, ExceptionHandler] = {
    SluiceError: sluice_error,
    HTTPException: http_error,
    RequestValidationError: validation_error,
    ClientDisconnect: client_disconnect,
    Exception: unexpected_error,
}


def install_error_handlers(app: FastAPI) -> None:
    for exc_class, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
