"""The admin API for the cache, guarded by the master key like the rest of /admin:

GET   /admin/cache         what is cached: models and their TTLs, the memory tier's size
POST  /admin/cache/flush   drop stored answers by namespace, model, both, or all
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sluice.api.admin import master_only
from sluice.cache.build import Cache
from sluice.errors import ConflictError, NotFoundError
from sluice.pipeline.auth_failures import AddressLockout


class ModelView(BaseModel):
    model: str
    ttl: float
    semantic: bool


class CacheView(BaseModel):
    models: list[ModelView]
    memory_entries: int
    memory_bytes: int
    redis: bool


class FlushRequest(BaseModel):
    namespace: str | None = Field(
        None,
        max_length=300,
        description="key:<key id>, team:<team>, global, master or public; omit for all",
    )
    model: str | None = Field(None, max_length=300, description="a served model; omit for all")


class FlushResult(BaseModel):
    flushed: int = Field(description="answers removed from this process's memory and Redis")
    everywhere: bool = Field(description="other processes were told to flush their memory")


def cache_admin_router(
    cache: Cache | None, master_key: str | None, lockout: AddressLockout | None = None
) -> APIRouter:
    api = APIRouter(prefix="/admin", tags=["cache"], dependencies=master_only(master_key, lockout))

    def configured() -> Cache:
        if cache is None:
            raise NotFoundError("The cache is not enabled (cache.enabled, or a model's cache).")
        return cache

    @api.get("/cache", response_model=CacheView)
    async def describe() -> CacheView:
        cached = configured()
        memory = cached.store.memory
        return CacheView(
            models=[
                ModelView(model=name, ttl=policy.ttl, semantic=policy.semantic)
                for name, policy in cached.policies.items()
            ],
            memory_entries=len(memory) if memory is not None else 0,
            memory_bytes=memory.bytes if memory is not None else 0,
            redis=cached.store.redis is not None,
        )

    @api.post("/cache/flush", response_model=FlushResult)
    async def flush(request: FlushRequest) -> FlushResult:
        cached = configured()
        if not cached.flushes_everywhere:
            raise ConflictError(
                "Several workers keep their own memory tier and no Redis connects them: a "
                "flush would reach one worker only. Set redis_url, or restart to clear."
            )
        flushed = await cached.flush(request.namespace, request.model)
        return FlushResult(flushed=flushed, everywhere=cached.channel is not None)

    return api
