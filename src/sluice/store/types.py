"""Column types shared by the schema (timestamps that are always aware UTC), and what a
text column can hold."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from sluice.store.periods import as_utc


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that takes and gives back aware UTC datetimes.

    PostgreSQL stores a real ``timestamptz``. SQLite has no time zones: values are
    stored as UTC text in SQLAlchemy's fixed-width format (so text comparison orders
    them correctly) and come back with ``tzinfo=UTC`` attached.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        utc = as_utc(value)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def storable_text(text: str) -> bool:
    """Could ``text`` be stored in a text column? PostgreSQL's cannot hold NUL (asyncpg
    raises on the query), so an id or name with one is known to be absent without asking."""
    return "\x00" not in text
