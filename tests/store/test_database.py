from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, text

from sluice.store.database import Database, default_database_url, normalise_url
from sluice.store.migrate import MIGRATIONS_DIR, current_revision, downgrade, upgrade
from sluice.store.schema import api_keys, metadata

HEAD = "0004"


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite"),
        ("postgresql://u@h/db", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg"),
        ("postgres://u@h/db", "postgresql+asyncpg"),
    ],
)
def test_urls_are_normalised_to_async_drivers(url: str, driver: str) -> None:
    assert normalise_url(url).drivername == driver


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        Database("mysql://u@h/db")


def test_default_url_is_a_sqlite_file_under_the_data_dir(tmp_path: Path) -> None:
    url = default_database_url(tmp_path / "data")
    assert url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'sluice.db'}"


def test_migrations_ship_inside_the_package() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert list((MIGRATIONS_DIR / "versions").glob("0001_*.py"))


async def test_start_migrates_to_head_and_rerunning_is_a_noop(fresh_url: str) -> None:
    db = Database(fresh_url)
    await db.start()
    try:
        assert await current_revision(db.engine) == HEAD
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("usage_records")}
            )
            # The migrated schema matches schema.py (no autogenerate differences).
            diffs = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), metadata)
            )
        assert {"api_keys", "usage_records", "alembic_version"} <= tables
        assert {
            "ix_usage_records_key_id",
            "ix_usage_records_created_at",
            "ix_usage_records_client_request_id",
        } <= indexes
        assert diffs == []

        await upgrade(db.writer)  # again: nothing to do, nothing breaks
        assert await current_revision(db.engine) == HEAD
    finally:
        await db.close()

    again = Database(fresh_url)  # a restart runs migrations again
    await again.start()
    try:
        assert await current_revision(again.engine) == HEAD
        await downgrade(again.writer, "base")
        async with again.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert not {"api_keys", "usage_records"} & tables
        await upgrade(again.writer)
        assert await current_revision(again.engine) == HEAD
    finally:
        await again.close()


async def test_0003_gives_existing_keys_default_cache_settings_and_goes_back(
    fresh_url: str,
) -> None:
    db = Database(fresh_url)
    await db.start()
    try:
        await downgrade(db.writer, "0002")
        async with db.writer.begin() as conn:
            # Only the columns named here are sent, all of which 0002 has.
            await conn.execute(
                insert(api_keys).values(
                    id="key_old",
                    key_hash="h",
                    display="d",
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            )
        await upgrade(db.writer)
        assert await current_revision(db.engine) == HEAD
        async with db.engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT team, cache_controls, semantic_cache FROM api_keys")
                )
            ).one()
        # An existing key keeps what every key could do before: steer the cache.
        assert (row.team, bool(row.cache_controls), row.semantic_cache) == (None, True, None)

        await downgrade(db.writer, "0002")
        async with db.engine.connect() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("api_keys")}
            )
            ids = (await conn.execute(text("SELECT id FROM api_keys"))).scalars().all()
        assert not {"team", "cache_controls", "semantic_cache"} & columns
        assert ids == ["key_old"]
    finally:
        await db.close()


async def test_replicas_starting_together_migrate_once(fresh_url: str) -> None:
    replicas = [Database(fresh_url) for _ in range(4)]
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        assert await current_revision(replicas[0].engine) == HEAD
    finally:
        for replica in replicas:
            await replica.close()


async def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a' / 'b.db'}")
    await db.start()
    try:
        async with db.engine.connect() as conn:
            assert (await conn.scalar(text("PRAGMA journal_mode"))) == "wal"
            assert (await conn.scalar(text("PRAGMA busy_timeout"))) == 5000
            assert (await conn.scalar(text("PRAGMA foreign_keys"))) == 1
    finally:
        await db.close()
    assert (tmp_path / "a" / "b.db").is_file()


async def test_in_memory_sqlite_works(tmp_path: Path) -> None:
    db = Database("sqlite://")
    await db.start()
    try:
        assert await current_revision(db.engine) == HEAD
    finally:
        await db.close()


async def test_engine_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start"):
        _ = Database("sqlite://").engine
