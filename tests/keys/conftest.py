"""The key store's tests run on SQLite and, when reachable, on PostgreSQL, with the
store's own database fixtures."""

from __future__ import annotations

from tests.store.conftest import database_url, db, postgres_unreachable, postgres_url

__all__ = ["database_url", "db", "postgres_unreachable", "postgres_url"]
