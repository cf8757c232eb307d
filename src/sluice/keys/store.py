"""Virtual keys in the database: the record and the store over the ``api_keys`` table."""

from __future__ import annotations

import builtins
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from sluice.store.database import Database
from sluice.store.periods import as_utc, current_period_start, is_budget_period, utcnow
from sluice.store.schema import api_keys
from sluice.store.types import storable_text

MUTABLE_FIELDS: frozenset[str] = frozenset(
    {
        "models",
        "model_limits",
        "rpm",
        "tpm",
        "max_parallel",
        "budget_usd",
        "budget_period",
        "expires_at",
        "priority",
        "metadata",
        "team",
        "cache_controls",
        "semantic_cache",
    }
)


class KeyConflictError(ValueError):
    """A key with this id or secret hash already exists."""


@dataclass(frozen=True)
class KeyRecord:
    """One row of ``api_keys``; datetimes are aware UTC, ``spend_usd`` is this period's."""

    id: str
    key_hash: str
    display: str
    models: list[str] | None = None  # None: every model
    model_limits: dict[str, dict[str, int]] | None = None  # {model: {"rpm": n, "tpm": n}}
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str | None = None  # "daily" | "weekly" | "monthly" | None: lifetime
    spend_usd: float = 0.0
    period_started_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    priority: int = 0  # the embedded engine's queue order for this key (higher first)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    team: str | None = None  # keys of one team may share cached answers (namespace "team")
    cache_controls: bool = True  # False: the request's Cache-Control / body `cache` are ignored
    semantic_cache: bool | None = None  # opt in or out of the semantic cache; None: the model's

    def __post_init__(self) -> None:
        if self.budget_period is not None and not is_budget_period(self.budget_period):
            raise ValueError(f"unknown budget period {self.budget_period!r}")
        for name in ("period_started_at", "expires_at", "revoked_at", "created_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value))

    def active(self, now: datetime | None = None) -> bool:
        """Neither revoked nor expired at ``now``."""
        now = utcnow() if now is None else now
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at

    def rolled(self, now: datetime | None = None) -> KeyRecord:
        """This record as of ``now``: spend 0 if its budget period has rolled over since."""
        if self.budget_period is None:
            return self
        start = current_period_start(self.budget_period, utcnow() if now is None else now)
        if self.period_started_at is not None and self.period_started_at >= start:
            return self
        return dataclasses.replace(self, spend_usd=0.0, period_started_at=start)

    def budget_left(self, now: datetime | None = None) -> float | None:
        """USD left in the current period, or None without a budget."""
        if self.budget_usd is None:
            return None
        return self.budget_usd - self.rolled(now).spend_usd


def _record(row: RowMapping) -> KeyRecord:
    values = dict(row)
    values["metadata"] = values["metadata"] or {}
    values["spend_usd"] = float(values["spend_usd"])  # SQLite's RETURNING skips REAL affinity
    if values["budget_usd"] is not None:
        values["budget_usd"] = float(values["budget_usd"])
    return KeyRecord(**values)


class KeyStore:
    """Keys in the database. Reads apply budget period roll-over lazily (see ``rolled``);
    the stored spend itself is reset by ``UsageStore.insert_many`` in SQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, record: KeyRecord) -> None:
        values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
        if record.budget_period is not None and record.period_started_at is None:
            values["period_started_at"] = current_period_start(
                record.budget_period, record.created_at
            )
        try:
            async with self._db.writer.begin() as conn:
                await conn.execute(insert(api_keys).values(values))
        except IntegrityError as exc:
            raise KeyConflictError(f"key {record.id!r} or its secret already exists") from exc

    async def get(self, key_id: str, *, now: datetime | None = None) -> KeyRecord | None:
        if not storable_text(key_id):
            return None
        return await self._one(api_keys.c.id == key_id, now)

    async def get_by_hash(self, key_hash: str, *, now: datetime | None = None) -> KeyRecord | None:
        return await self._one(api_keys.c.key_hash == key_hash, now)

    async def list(
        self, include_revoked: bool = False, *, now: datetime | None = None
    ) -> builtins.list[KeyRecord]:
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [_record(row).rolled(now) for row in rows]

    async def update(
        self, key_id: str, *, now: datetime | None = None, **fields: Any
    ) -> KeyRecord | None:
        """Change mutable fields; returns the new record, or None for an unknown key.

        Changing ``budget_period`` starts a new period at ``now`` (spend is kept).
        """
        if not storable_text(key_id):
            return None
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; mutable: {sorted(MUTABLE_FIELDS)}")
        values: dict[str, Any] = dict(fields)
        if "budget_period" in values:
            period = values["budget_period"]
            if period is not None and not is_budget_period(period):
                raise ValueError(f"unknown budget period {period!r}")
            values["period_started_at"] = (
                None if period is None else current_period_start(period, now or utcnow())
            )
        if values.get("metadata", {}) is None:
            values["metadata"] = {}
        if values.get("expires_at") is not None:
            values["expires_at"] = as_utc(values["expires_at"])
        if not values:
            return await self.get(key_id, now=now)
        stmt = update(api_keys).where(api_keys.c.id == key_id).values(values).returning(*api_keys.c)
        async with self._db.writer.begin() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        return None if row is None else _record(row).rolled(now)

    async def revoke(self, key_id: str, *, now: datetime | None = None) -> bool:
        """Revoke a key; False if it is unknown or already revoked."""
        if not storable_text(key_id):
            return False
        stmt = (
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
        )
        async with self._db.writer.begin() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount == 1)

    async def _one(self, where: Any, now: datetime | None) -> KeyRecord | None:
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(where))).mappings().first()
        return None if row is None else _record(row).rolled(now)
