"""Durable state over SQLite or PostgreSQL: the database, its schema (the ``api_keys`` table
included; `sluice.keys.store` reads and writes it), budget periods and usage records.

SQLAlchemy async Core (no ORM) on aiosqlite or asyncpg; the schema is owned by the
Alembic migrations in ``sluice/store/migrations`` and run by ``Database.start()``.
"""

from __future__ import annotations

from sluice.store.database import Database, default_database_url
from sluice.store.periods import BudgetPeriod, current_period_start
from sluice.store.recorder import UsageRecorder
from sluice.store.usage import UsageRecord, UsageStore

__all__ = [
    "BudgetPeriod",
    "Database",
    "UsageRecord",
    "UsageRecorder",
    "UsageStore",
    "current_period_start",
    "default_database_url",
]
