"""The admin API's key routes, mounted under ``/admin`` behind the master key by
`sluice.api.admin.admin_router`:

    POST   /admin/keys          create a key; the secret is in the 201 answer and nowhere else
    GET    /admin/keys          list keys (``include_revoked=true`` for all)
    GET    /admin/keys/{id}     one key
    PATCH  /admin/keys/{id}     change models, limits, budget, expiry, metadata, cache settings
    DELETE /admin/keys/{id}     revoke (every replica's key cache drops it)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sluice.errors import NotFoundError
from sluice.keys.service import KeyService, KeySettings
from sluice.keys.store import KeyRecord


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
    team: str | None
    cache_controls: bool
    semantic_cache: bool | None

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


def key_routes(service: KeyService) -> APIRouter:
    """The ``/keys`` routes, without prefix or guard: `admin_router` adds both."""
    router = APIRouter()

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

    return router
