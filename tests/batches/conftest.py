"""Batch fixtures: the store tests' databases (SQLite, and PostgreSQL when reachable)."""

from __future__ import annotations

from tests.store.conftest import database_url, db, postgres_unreachable, postgres_url

__all__ = ["database_url", "db", "postgres_unreachable", "postgres_url"]
