"""The admin API: virtual keys and usage, guarded by the master key.

    /admin/keys…                virtual keys (`sluice.keys.admin_api`)
    GET    /admin/usage         usage and spend by key, model and day

Routing at run time (aliases' weights, configuration reload) is in `sluice.api.admin_routing`.

FastAPI documents these routes at ``/docs``; errors use the same OpenAI envelope as /v1.

FastAPI reads and parses a body before a route's dependencies run, so the master key is
checked by `AdminGate`, a pure ASGI layer in front of FastAPI, on the headers alone: a
stranger's body is never read, and the master key's own bodies are capped
(``server.max_admin_body_bytes``). The same gate keeps ``/docs`` and ``/openapi.json``
behind the master key when ``server.docs`` says so (`docs_access`).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.edge import is_loopback
from sluice.api.errors import send_error
from sluice.errors import (
    AuthenticationError,
    PayloadTooLargeError,
    PermissionDeniedError,
    SluiceError,
)
from sluice.keys.admin_api import key_routes
from sluice.keys.service import KeyService, UtcMoment
from sluice.pipeline.auth import credential
from sluice.pipeline.auth_failures import AddressLockout
from sluice.settings import ConfigError
from sluice.store.usage import UsageStore


class UsageList(BaseModel):
    data: list[dict[str, Any]]


DocsAccess = Literal["master_key", "public", "off"]
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})


def docs_access(policy: str, master_key: str | None, host: str) -> DocsAccess:
    """Who may read ``/docs`` and ``/openapi.json`` (``server.docs``): ``auto`` puts them
    behind the master key when there is one; without one they are public only on a
    loopback bind (the admin API is then disabled anyway) and off elsewhere."""
    if policy == "auto":
        if master_key is not None:
            return "master_key"
        return "public" if is_loopback(host) else "off"
    if policy == "master_key" and master_key is None:
        raise ConfigError("server.docs is master_key, but auth.master_key is not set")
    if policy not in ("master_key", "public", "off"):
        raise ConfigError(f"server.docs: unknown policy {policy!r}")
    return policy  # type: ignore[return-value]


def check_master(
    scope: Scope,
    master_key: str | None,
    what: str = "admin API",
    lockout: AddressLockout | None = None,
) -> None:
    """Raise unless the request carries the master key (headers only; no body is read).
    An address that failed too often gets 429 without its guess being compared."""
    if master_key is None:
        raise PermissionDeniedError(
            f"The {what} is disabled: set auth.master_key.", code="admin_disabled"
        )
    secret = credential(scope["headers"], scope["query_string"])
    if secret is None:
        raise AuthenticationError(f"The {what} needs the master key.", code="missing_api_key")
    client = scope.get("client")
    address = client[0] if client else None
    if lockout is not None:
        lockout.check(address)
    if not hmac.compare_digest(secret.encode(), master_key.encode()):
        if lockout is not None:
            lockout.failed(address)
        raise PermissionDeniedError(f"Only the master key may use the {what}.", code="not_admin")


class AdminGate:
    """Pure ASGI layer in front of FastAPI: the master key before any body is read, a
    cap on admin bodies, and the docs policy. Hot routes never pass through it."""

    def __init__(
        self,
        app: ASGIApp,
        master_key: str | None,
        docs: DocsAccess,
        max_body_bytes: int,
        lockout: AddressLockout | None = None,
    ) -> None:
        self.app = app
        self.master_key = master_key
        self.docs = docs
        self.max_body = max_body_bytes
        self.lockout = lockout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        try:
            if path == "/admin" or path.startswith("/admin/"):
                check_master(scope, self.master_key, lockout=self.lockout)
                _check_declared_length(scope, self.max_body)
                capped = _CappedBody(receive, send, self.max_body)
                await self.app(scope, capped.receive, capped.send)
                return
            if path in DOCS_PATHS and self.docs == "master_key":
                check_master(scope, self.master_key, "API documentation", self.lockout)
        except SluiceError as error:
            await send_error(send, error, close=True)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"Admin request bodies are limited to {limit} bytes (server.max_admin_body_bytes)."
    )


def _check_declared_length(scope: Scope, limit: int) -> None:
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > limit):
            raise _too_large(limit)


class _CappedBody:
    """Counts the body as the app reads it; past the cap it answers 413 itself, tells the
    app the client left, and drops whatever the app then sends."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive = receive
        self._send = send
        self._limit = limit
        self._seen = 0
        self._refused = False

    async def receive(self) -> Message:
        if self._refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                self._refused = True
                await send_error(self._send, _too_large(self._limit), close=True)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if not self._refused:
            await self._send(message)


def master_only(master_key: str | None, lockout: AddressLockout | None) -> list[Any]:
    """The dependencies of an admin router: the master key. `AdminGate` has checked it
    already; checked again so that a router is safe wherever it is mounted."""

    async def require_master(request: Request) -> None:
        check_master(request.scope, master_key, lockout=lockout)

    return [Depends(require_master)]


def admin_router(
    service: KeyService,
    usage: UsageStore,
    master_key: str | None,
    lockout: AddressLockout | None = None,
) -> APIRouter:
    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=master_only(master_key, lockout)
    )
    router.include_router(key_routes(service))

    @router.get("/usage", response_model=UsageList)
    async def read_usage(
        key_id: str | None = None,
        model: str | None = None,
        since: UtcMoment | None = None,
        until: UtcMoment | None = None,
        group_by: Annotated[list[Literal["key", "model", "day"]] | None, Query()] = None,
    ) -> UsageList:
        rows = await usage.query(
            key_id=key_id,
            model=model,
            since=since,
            until=until,
            group_by=tuple(group_by or ("key", "model", "day")),
        )
        return UsageList(data=rows)

    return router
