"""What ``sluice keys …`` and ``sluice usage`` do: the key service, straight on the database.

Revocations and changes are published on Redis (when configured) so running replicas drop
the key from their caches at once; without Redis a running server notices within
``auth.key_cache_ttl`` seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, cast

import orjson

from sluice.keys import KeyService, KeySettings
from sluice.pipeline.invalidation import KeyInvalidation
from sluice.services import database_for, redis_for
from sluice.settings import Settings
from sluice.store.keys import KeyStore
from sluice.store.usage import UsageStore


@asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[tuple[KeyService, UsageStore]]:
    database = database_for(settings)
    await database.start()
    redis = redis_for(settings)
    try:
        invalidation = KeyInvalidation(redis, lambda _: None)
        yield KeyService(KeyStore(database), invalidation), UsageStore(database)
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
    async with _opened(settings) as (service, _):
        record, secret = await service.create(spec)
    return (
        f"id:      {record.id}\nkey:     {secret}\n"
        "(the key is shown only now: store it somewhere safe)"
    )


async def list_keys(settings: Settings, include_revoked: bool) -> str:
    async with _opened(settings) as (service, _):
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
    async with _opened(settings) as (service, _):
        if await service.revoke(key_id) is None:
            raise LookupError(f"no API key with id {key_id!r}")
    return f"revoked {key_id}"


async def show_usage(
    settings: Settings,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    group_by: Sequence[str],
) -> str:
    async with _opened(settings) as (_, usage):
        rows = await usage.query(
            key_id=key_id,
            model=model,
            since=since.replace(tzinfo=UTC) if since and since.tzinfo is None else since,
            group_by=cast(Sequence[Literal["key", "model", "day"]], group_by),
        )
    return "\n".join(orjson.dumps(row, default=str).decode() for row in rows) or "(no usage)"
