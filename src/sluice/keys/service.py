"""Managing virtual keys: one service behind both the admin API and the ``sluice keys`` CLI."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sluice.keys import format as key_format
from sluice.keys.invalidation import KeyInvalidation
from sluice.keys.store import KeyRecord, KeyStore
from sluice.store.periods import current_period_start
from sluice.store.types import storable_text

Period = Literal["daily", "weekly", "monthly"]


INT32_MAX = 2**31 - 1  # the columns are 32-bit integers on PostgreSQL


def to_utc(moment: datetime) -> datetime:
    """``moment`` in UTC, a naive one taken as UTC. A moment that leaves datetime's range
    once converted (the year 9999 west of UTC, the year 1 east of it) is refused as a
    validation error, not left to overflow where it is stored or compared."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the date is out of range once converted to UTC") from None


UtcMoment = Annotated[datetime, AfterValidator(to_utc)]

TEAM_MAX_LENGTH = 200


def team_name(name: str) -> str:
    """``name`` if it can name a team: printable (no control, format or separator characters
    but the space, no lone surrogates, no NUL: `storable_text`) and without surrounding
    spaces, which would make two teams that read the same. The name becomes part of a cache
    namespace and is shown in listings and logs, so nothing in it may hide or fake text."""
    if not (name.isprintable() and storable_text(name)):
        raise ValueError("a team name must be printable text (no control characters)")
    if name != name.strip():
        raise ValueError("a team name must not start or end with spaces")
    return name


TeamName = Annotated[
    str, Field(min_length=1, max_length=TEAM_MAX_LENGTH, strict=True), AfterValidator(team_name)
]

MAX_NESTING = 32
"""Levels of objects and arrays in a key's metadata."""


def storable(value: Any) -> Any:
    """``value`` if the database and the JSON answer can hold it: no string that is not
    Unicode text (JSON's ``\\u`` escapes can carry lone surrogates, which neither UTF-8
    nor the answer can encode), no infinite number (``1e400`` parses as one; PostgreSQL's
    JSON refuses it) and no nesting past `MAX_NESTING` (the answer's serialiser stops at a
    depth the request's parser accepts)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise ValueError("strings must be Unicode text (no lone surrogates)") from None
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
        elif isinstance(item, dict | list):
            if depth >= MAX_NESTING:
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
    return value


class ModelLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(None, ge=1, le=INT32_MAX)
    max_parallel: int | None = Field(None, ge=1, le=INT32_MAX)


class KeySettings(BaseModel):
    """What a key may do. Every field is optional; absent means unlimited."""

    model_config = ConfigDict(extra="forbid")
    models: Annotated[list[str] | None, AfterValidator(storable)] = Field(
        None, description="allowed models; null for all"
    )
    model_limits: Annotated[dict[str, ModelLimit] | None, AfterValidator(storable)] = Field(
        None, description="limits per model"
    )
    rpm: int | None = Field(None, ge=1, le=INT32_MAX, description="requests per minute")
    tpm: int | None = Field(None, ge=1, le=INT32_MAX, description="tokens per minute")
    max_parallel: int | None = Field(None, ge=1, le=INT32_MAX, description="concurrent requests")
    budget_usd: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="spend limit in USD"
    )
    budget_period: Period | None = Field(None, description="budget resets; null: lifetime")
    expires_at: UtcMoment | None = None
    priority: int = Field(
        0, ge=-100, le=100, description="queue order on the embedded model (higher first)"
    )
    metadata: Annotated[dict[str, Any], AfterValidator(storable)] = Field(
        default_factory=dict, description="user, team, …"
    )
    team: TeamName | None = Field(
        None, description="the team whose keys may share cached answers (cache namespace 'team')"
    )
    cache_controls: bool = Field(
        True,
        strict=True,
        description="may requests steer the cache (Cache-Control, the body's 'cache' field)",
    )
    semantic_cache: bool | None = Field(
        None, strict=True, description="semantic cache on or off for this key; null: the model's"
    )


class KeyService:
    def __init__(self, keys: KeyStore, invalidation: KeyInvalidation) -> None:
        self.store = keys
        self._invalidation = invalidation

    async def create(self, spec: KeySettings) -> tuple[KeyRecord, str]:
        """Store a new key; return its record and the secret (never stored)."""
        new = key_format.generate()
        now = datetime.now(UTC)
        record = KeyRecord(
            id=key_format.new_key_id(),
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
            team=spec.team,
            cache_controls=spec.cache_controls,
            semantic_cache=spec.semantic_cache,
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
