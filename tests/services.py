"""Fixtures' helpers for tests that need Redis or PostgreSQL: reach them or skip with a reason."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require_redis() -> str:
    if not _listening(6379):
        pytest.skip("Redis not reachable at 127.0.0.1:6379 (start it to run this test)")
    return REDIS_URL


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test; dropped afterwards."""
    if not _listening(5432):
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432 (start it to run this test)")
    import asyncpg

    name = f"sluice_it_{secrets.token_hex(4)}"

    async def admin(sql: str) -> str:
        for user in ("postgres", "root"):
            try:
                conn = await asyncpg.connect(f"postgresql://{user}@127.0.0.1:5432/test")
            except (OSError, asyncpg.PostgresError):
                continue
            try:
                await conn.execute(sql)
            finally:
                await conn.close()
            return user
        pytest.skip("PostgreSQL at 127.0.0.1:5432 accepts neither user postgres nor root")

    user = asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
