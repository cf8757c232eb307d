"""Durable state: API keys, budgets and usage records over SQLite or PostgreSQL.

SQLAlchemy async Core (no ORM) on aiosqlite or asyncpg; the schema is owned by the
Alembic migrations in ``sluice/store/migrations`` and run by ``Database.start()``.
"""

from __future__ import annotations

from sluice.store.database import Database, default_database_url
from sluice.store.keys import KeyConflictError, KeyRecord, KeyStore
from sluice.store.periods import BudgetPeriod, current_period_start
from sluice.store.recorder import UsageRecorder
from sluice.store.usage import UsageRecord, UsageStore

__all__ = [
    "BudgetPeriod",
    "Database",
    "KeyConflictError",
    "KeyRecord",
    "KeyStore",
    "UsageRecord",
    "UsageRecorder",
    "UsageStore",
    "current_period_start",
    "default_database_url",
]
