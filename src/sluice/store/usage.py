"""Usage records: idempotent batched inserts, per-key spend, and aggregate queries."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Float, bindparam, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from sluice.store.database import Database
from sluice.store.periods import as_utc, current_period_start, utcnow
from sluice.store.schema import api_keys, usage_records
from sluice.store.types import UTCDateTime

GroupBy = Literal["key", "model", "day"]
_GROUP_NAMES: dict[str, str] = {"key": "key_id", "model": "model", "day": "day"}


@dataclass(frozen=True)
class UsageRecord:
    """One request's usage; ``request_id`` makes writing it idempotent."""

    request_id: str
    model: str
    key_id: str | None = None
    deployment: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    status: int = 200
    cache_hit: bool = False
    stream: bool = False
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        object.__setattr__(self, "created_at", as_utc(self.created_at))

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["created_at"] = self.created_at.isoformat()
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> UsageRecord:
        values = dict(values)
        values["created_at"] = datetime.fromisoformat(values["created_at"])
        return cls(**values)


# Spend for periodic keys, applied per (key, period start of the records' created_at):
# a newer period resets the spend, the same period adds to it, and an older period (a
# late or replayed record) leaves the current period's spend alone.
_P = bindparam("b_period_start", type_=UTCDateTime())
_COST = bindparam("b_cost", type_=Float())
_started = api_keys.c.period_started_at
_rolls = or_(_started.is_(None), _started < _P)
_PERIODIC_SPEND = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("b_key"))
    .values(
        spend_usd=case(
            (_rolls, _COST),
            (_started == _P, api_keys.c.spend_usd + _COST),
            else_=api_keys.c.spend_usd,
        ),
        period_started_at=case((_rolls, _P), else_=_started),
    )
)
_LIFETIME_SPEND = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("b_key"))
    .values(spend_usd=api_keys.c.spend_usd + _COST)
)


class UsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_many(self, records: Sequence[UsageRecord]) -> int:
        """Insert records not already stored and charge their cost to their keys, in one
        transaction; returns how many were new. Replaying a batch changes nothing."""
        unique = list({r.request_id: r for r in reversed(records)}.values())[::-1]
        if not unique:
            return 0
        dialect = self._db.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = (
            insert(usage_records)
            .on_conflict_do_nothing(index_elements=[usage_records.c.request_id])
            .returning(usage_records.c.request_id)
        )
        rows = [dataclasses.asdict(r) for r in unique]
        async with self._db.writer.begin() as conn:
            inserted = set((await conn.execute(stmt, rows)).scalars().all())
            charged = [r for r in unique if r.request_id in inserted and r.key_id and r.cost_usd]
            if charged:
                await _charge(conn, charged)
        return len(inserted)

    async def query(
        self,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[GroupBy] = ("key", "model", "day"),
    ) -> list[dict[str, Any]]:
        """Totals per group, over ``since <= created_at < until``.

        Each row has ``requests``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``
        and the grouped columns: ``key_id``, ``model``, ``day`` ('YYYY-MM-DD', UTC).
        """
        t = usage_records
        columns: dict[str, ColumnElement[Any]] = {"key_id": t.c.key_id, "model": t.c.model}
        columns["day"] = self._day(t.c.created_at)
        groups = [columns[_GROUP_NAMES[g]].label(_GROUP_NAMES[g]) for g in dict.fromkeys(group_by)]
        stmt = select(
            *groups,
            func.count().label("requests"),
            func.coalesce(func.sum(t.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(t.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(t.c.cost_usd), 0.0).label("cost_usd"),
        )
        if key_id is not None:
            stmt = stmt.where(t.c.key_id == key_id)
        if model is not None:
            stmt = stmt.where(t.c.model == model)
        if since is not None:
            stmt = stmt.where(t.c.created_at >= as_utc(since))
        if until is not None:
            stmt = stmt.where(t.c.created_at < as_utc(until))
        if groups:
            stmt = stmt.group_by(*groups).order_by(*(g.asc().nulls_last() for g in groups))
        async with self._db.engine.connect() as conn:
            result = (await conn.execute(stmt)).mappings().all()
        return [_row(r) for r in result if groups or r["requests"]]

    async def count(self) -> int:
        async with self._db.engine.connect() as conn:
            return int((await conn.scalar(select(func.count()).select_from(usage_records))) or 0)

    def _day(self, column: ColumnElement[Any]) -> ColumnElement[str]:
        if self._db.engine.dialect.name == "postgresql":
            return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
        return func.strftime("%Y-%m-%d", column)  # stored as UTC text


def _row(row: Any) -> dict[str, Any]:
    values = dict(row)
    for name in ("requests", "prompt_tokens", "completion_tokens"):
        values[name] = int(values[name])
    values["cost_usd"] = float(values["cost_usd"])
    return values


async def _charge(conn: AsyncConnection, records: Sequence[UsageRecord]) -> None:
    """Add ``records``' cost to their keys' spend, applying budget period roll-over."""
    key_ids = sorted({r.key_id for r in records if r.key_id})
    periods_stmt = (
        select(api_keys.c.id, api_keys.c.budget_period)
        .where(api_keys.c.id.in_(key_ids))
        .order_by(api_keys.c.id)
        .with_for_update()  # PostgreSQL: hold the rows until commit; SQLite: ignored
    )
    periods: dict[str, str | None] = {
        key_id: period for key_id, period in (await conn.execute(periods_stmt)).all()
    }
    lifetime: defaultdict[str, float] = defaultdict(float)
    periodic: defaultdict[tuple[datetime, str], float] = defaultdict(float)
    for record in records:
        assert record.key_id is not None
        if record.key_id not in periods:
            continue  # a key from the config file, or deleted: no stored spend
        period = periods[record.key_id]
        if period is None:
            lifetime[record.key_id] += record.cost_usd
        else:
            start = current_period_start(period, record.created_at)
            periodic[(start, record.key_id)] += record.cost_usd
    if lifetime:
        params = [{"b_key": k, "b_cost": c} for k, c in sorted(lifetime.items())]
        await conn.execute(_LIFETIME_SPEND, params)
    if periodic:
        # Oldest period first, so a key's newest period is the one left standing.
        params = [
            {"b_key": k, "b_period_start": start, "b_cost": c}
            for (start, k), c in sorted(periodic.items())
        ]
        await conn.execute(_PERIODIC_SPEND, params)
