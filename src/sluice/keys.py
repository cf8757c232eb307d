"""Managing virtual keys: one service behind both the admin API and the ``sluice keys`` CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sluice.pipeline import apikeys
from sluice.pipeline.invalidation import KeyInvalidation
from sluice.store.keys import KeyRecord, KeyStore
from sluice.store.periods import current_period_start

Period = Literal["daily", "weekly", "monthly"]


INT32_MAX = 2**31 - 1  # the columns are 32-bit integers on PostgreSQL


class ModelLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(None, ge=1, le=INT32_MAX)
    max_parallel: int | None = Field(None, ge=1, le=INT32_MAX)


class KeySettings(BaseModel):
    """What a key may do. Every field is optional; absent means unlimited."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] | None = Field(None, description="allowed models; null for all")
    model_limits: dict[str, ModelLimit] | None = Field(None, description="limits per model")
    rpm: int | None = Field(None, ge=1, le=INT32_MAX, description="requests per minute")
    tpm: int | None = Field(None, ge=1, le=INT32_MAX, description="tokens per minute")
    max_parallel: int | None = Field(None, ge=1, le=INT32_MAX, description="concurrent requests")
    budget_usd: float | None = Field(None, ge=0, description="spend limit in USD")
    budget_period: Period | None = Field(None, description="budget resets; null: lifetime")
    expires_at: datetime | None = None
    priority: int = Field(
        0, ge=-100, le=100, description="queue order on the embedded model (higher first)"
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="user, team, …")


class KeyService:
    def __init__(self, keys: KeyStore, invalidation: KeyInvalidation) -> None:
        self.store = keys
        self._invalidation = invalidation

    async def create(self, spec: KeySettings) -> tuple[KeyRecord, str]:
        """Store a new key; return its record and the secret (never stored)."""
        new = apikeys.generate()
        now = datetime.now(UTC)
        record = KeyRecord(
            id=apikeys.new_key_id(),
            key_hash=new.key_hash,
            display=new.display,
            models=spec.models,
            model_limits=_limits(spec.model_limits),
            rpm=spec.rpm,
            tpm=spec.tpm,
            max_parallel=spec.max_parallel,
            budget_usd=spec.budget_usd,
            budget_period=spec.budget_period,
            spend_usd=0.0,
            period_started_at=(
                current_period_start(spec.budget_period, now) if spec.budget_period else None
            ),
            expires_at=_utc(spec.expires_at),
            revoked_at=None,
            priority=spec.priority,
            metadata=spec.metadata,
            created_at=now,
        )
        await self.store.create(record)
        await self._invalidation.publish(record.key_hash)  # forget a cached "unknown key"
        return record, new.secret

    async def update(self, key_id: str, change: KeySettings) -> KeyRecord | None:
        record = await self.store.get(key_id)
        if record is None:
            return None
        fields = change.model_dump(exclude_unset=True)
        if "model_limits" in fields:
            fields["model_limits"] = _limits(change.model_limits)
        if "expires_at" in fields:
            fields["expires_at"] = _utc(change.expires_at)
        updated = await self.store.update(key_id, **fields) if fields else record
        await self._invalidation.publish(record.key_hash)
        return updated

    async def revoke(self, key_id: str) -> KeyRecord | None:
        record = await self.store.get(key_id)
        if record is None:
            return None
        await self.store.revoke(key_id)
        await self._invalidation.publish(record.key_hash)
        return record


def _limits(limits: dict[str, ModelLimit] | None) -> dict[str, dict[str, int]] | None:
    if limits is None:
        return None
    return {
        model: {k: v for k, v in limit.model_dump().items() if v is not None}
        for model, limit in limits.items()
    }


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
