"""What ``sluice keys …`` does: the key service, straight on the database.

Revocations and changes are published on Redis (when configured) so running replicas drop
the key from their caches at once; without Redis a running server notices within
``auth.key_cache_ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sluice.keys.invalidation import KeyInvalidation
from sluice.keys.service import KeyService, KeySettings
from sluice.keys.store import KeyStore
from sluice.services import database_for, redis_for
from sluice.settings import Settings


@asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[KeyService]:
    database = database_for(settings)
    await database.start()
    redis = redis_for(settings)
    try:
        invalidation = KeyInvalidation(redis, lambda _: None)
        yield KeyService(KeyStore(database), invalidation)
    finally:
        if redis is not None:
            await redis.aclose()
        await database.close()


async def create_key(settings: Settings, options: dict[str, Any]) -> str:
    metadata = dict(item.split("=", 1) for item in options.pop("meta") or () if "=" in item)
    models = options.pop("models")
    spec = KeySettings(
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        metadata=metadata,
        **{k: v for k, v in options.items() if v is not None},
    )
    async with _opened(settings) as service:
        record, secret = await service.create(spec)
    return (
        f"id:      {record.id}\nkey:     {secret}\n"
        "(the key is shown only now: store it somewhere safe)"
    )


async def list_keys(settings: Settings, include_revoked: bool) -> str:
    async with _opened(settings) as service:
        records = await service.store.list(include_revoked)
    lines = [
        f"{'ID':<18} {'KEY':<20} {'MODELS':<24} {'RPM':>6} {'TPM':>8} {'SPEND':>10} "
        f"{'BUDGET':>8}  STATE"
    ]
    now = datetime.now(UTC)
    for r in records:
        state = "revoked" if r.revoked_at else "expired" if not r.active(now) else "active"
        lines.append(
            f"{r.id:<18} {r.display:<20} {','.join(r.models or ['*']):<24.24} "
            f"{r.rpm or '-':>6} {r.tpm or '-':>8} {r.spend_usd:>10.4f} "
            f"{r.budget_usd if r.budget_usd is not None else '-':>8}  {state}"
        )
    return "\n".join(lines)


async def revoke_key(settings: Settings, key_id: str) -> str:
    async with _opened(settings) as service:
        if await service.revoke(key_id) is None:
            raise LookupError(f"no API key with id {key_id!r}")
    return f"revoked {key_id}"
