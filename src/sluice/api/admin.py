"""The admin API: virtual keys and usage, guarded by the master key.

    POST   /admin/keys          create a key; the secret is in the 201 answer and nowhere else
    GET    /admin/keys          list keys (``include_revoked=true`` for all)
    GET    /admin/keys/{id}     one key
    PATCH  /admin/keys/{id}     change models, limits, budget, expiry, metadata
    DELETE /admin/keys/{id}     revoke (every replica's key cache drops it)
    GET    /admin/usage         usage and spend by key, model and day

FastAPI documents these routes at ``/docs``; errors use the same OpenAI envelope as /v1.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from sluice.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from sluice.keys import KeyService, KeySettings
from sluice.pipeline.auth import credential
from sluice.pipeline.auth_failures import AddressLockout
from sluice.store.keys import KeyRecord
from sluice.store.usage import UsageStore


class KeyUpdate(KeySettings):
    """Only the fields present in the request change."""


class KeyView(BaseModel):
    id: str
    display: str
    models: list[str] | None
    model_limits: dict[str, dict[str, int]] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_usd: float | None
    budget_period: str | None
    spend_usd: float
    expires_at: datetime | None
    revoked_at: datetime | None
    priority: int
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, record: KeyRecord) -> KeyView:
        return cls(**{name: getattr(record, name) for name in cls.model_fields})


class KeyCreated(KeyView):
    key: str = Field(description="the secret; shown only in this answer")


class KeyList(BaseModel):
    data: list[KeyView]


class Revoked(BaseModel):
    id: str
    revoked: bool


class UsageList(BaseModel):
    data: list[dict[str, Any]]


def admin_router(
    service: KeyService,
    usage: UsageStore,
    master_key: str | None,
    lockout: AddressLockout | None = None,
) -> APIRouter:
    async def require_master(request: Request) -> None:
        if master_key is None:
            raise PermissionDeniedError(
                "The admin API is disabled: set auth.master_key.", code="admin_disabled"
            )
        secret = credential(request.scope["headers"], request.scope["query_string"])
        if secret is None:
            raise AuthenticationError("The admin API needs the master key.", code="missing_api_key")
        address = request.client.host if request.client else None
        if lockout is not None:
            lockout.check(address)  # 429 for an address that failed too often: no more guesses
        if not hmac.compare_digest(secret.encode(), master_key.encode()):
            if lockout is not None:
                lockout.failed(address)
            raise PermissionDeniedError(
                "Only the master key may use the admin API.", code="not_admin"
            )

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_master)])

    def missing(key_id: str) -> NotFoundError:
        return NotFoundError(f"No API key with id '{key_id}'.", code="key_not_found")

    @router.post("/keys", status_code=201, response_model=KeyCreated)
    async def create_key(spec: KeySettings | None = None) -> KeyCreated:
        record, secret = await service.create(spec or KeySettings())
        return KeyCreated(**KeyView.of(record).model_dump(), key=secret)

    @router.get("/keys", response_model=KeyList)
    async def list_keys(include_revoked: bool = False) -> KeyList:
        return KeyList(data=[KeyView.of(r) for r in await service.store.list(include_revoked)])

    @router.get("/keys/{key_id}", response_model=KeyView)
    async def show_key(key_id: str) -> KeyView:
        record = await service.store.get(key_id)
        if record is None:
            raise missing(key_id)
        return KeyView.of(record)

    @router.patch("/keys/{key_id}", response_model=KeyView)
    async def update_key(key_id: str, change: KeyUpdate) -> KeyView:
        updated = await service.update(key_id, change)
        if updated is None:
            raise missing(key_id)
        return KeyView.of(updated)

    @router.delete("/keys/{key_id}", response_model=Revoked)
    async def revoke_key(key_id: str) -> Revoked:
        if await service.revoke(key_id) is None:
            raise missing(key_id)
        return Revoked(id=key_id, revoked=True)

    @router.get("/usage", response_model=UsageList)
    async def read_usage(
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
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
