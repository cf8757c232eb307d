"""Store fixtures: every store test runs on SQLite and, when reachable, on PostgreSQL.

PostgreSQL tests get a throwaway database per test module (created through an
AUTOCOMMIT connection to the ``test`` database and dropped afterwards), so migrations
run from scratch; tables are emptied between the tests of a module. Point
``SLUICE_TEST_POSTGRES_URL`` elsewhere to use another server.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import delete

from sluice.store.database import Database
from sluice.store.schema import metadata

ADMIN_URL = os.environ.get("SLUICE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=2)  # asyncpg runs outside transactions
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        where = ADMIN_URL.split("@")[-1].split("/")[0]
        return f"PostgreSQL not reachable at {where}: {type(exc).__name__}: {exc}"
    return None


def temp_postgres_database(reason: str | None) -> Iterator[str]:
    if reason is not None:
        pytest.skip(reason)
    name = f"sluice_test_{secrets.token_hex(4)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def postgres_url(postgres_unreachable: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database for this test module."""
    yield from temp_postgres_database(postgres_unreachable)


@pytest.fixture(params=BACKENDS)
def fresh_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_unreachable: str | None
) -> Iterator[str]:
    """An empty database per test, so migrations really start from nothing."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'sluice.db'}"
    else:
        yield from temp_postgres_database(postgres_unreachable)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'sluice.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.start()
    try:
        async with database.writer.begin() as conn:  # empty tables left by earlier tests
            for table in reversed(metadata.sorted_tables):
                await conn.execute(delete(table))
        yield database
    finally:
        await database.close()
