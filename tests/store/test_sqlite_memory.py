"""SQLite's memory stays bounded however many usage records the gateway writes.

The page cache grows with the usage table up to its size limit; it was 64 MiB per pooled
connection, and a soak of a million requests saw the gateway's RSS double on its way
there (issue 18, point 10). ``sqlite3_memory_used()`` is every connection's memory in
the process: the SQLite library of the ``sqlite3`` module is found through its extension
module, whether it links a shared library or its own copy.
"""

from __future__ import annotations

import _sqlite3
import asyncio
import ctypes
import os
from pathlib import Path

import pytest

from sluice.store.database import SQLITE_MEMORY_LIMIT, Database
from sluice.store.usage import UsageRecord, UsageStore, now_micros

# Enough rows for a table (and its random-key primary-key index) well beyond the limit:
# about 14 MiB of page cache without one.
ROWS = 60_000
BATCH = 500
SLACK = 2 * 1024 * 1024  # schema, prepared statements, lookaside: not page cache


def _memory_used() -> ctypes._CFuncPtr:
    try:
        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (OSError, AttributeError):
        pytest.skip("SQLite's memory statistics are not reachable from ctypes here")
    used.restype = ctypes.c_int64
    return used


def _records(start: int, count: int) -> list[UsageRecord]:
    now = now_micros()
    return [
        UsageRecord(os.urandom(16).hex(), "m1", now + i, "key_a", "d1", 11, 9, 0.0, 1.0)
        for i in range(start, start + count)
    ]


async def _fill(db: Database, rows: int) -> int:
    """Write ``rows`` usage records in the recorder's batches; SQLite's peak memory."""
    used = _memory_used()
    store = UsageStore(db)
    peak = 0
    for start in range(0, rows, BATCH):
        await store.insert_many(_records(start, BATCH))
        peak = max(peak, used())
    assert await store.count() == rows
    return peak


@pytest.mark.slow
async def test_sqlite_memory_stays_under_the_limit_as_usage_grows(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sluice.db'}")
    await db.start()
    try:
        peak = await _fill(db, ROWS)
    finally:
        await db.close()
    assert peak <= SQLITE_MEMORY_LIMIT + SLACK


@pytest.mark.slow
async def test_the_limit_is_one_for_the_whole_process(tmp_path: Path) -> None:
    """Every connection has a page cache of its own (the pool's, and those of other
    databases): together they stay under the one limit, not one limit each."""
    dbs = [Database(f"sqlite:///{tmp_path / f'sluice{n}.db'}") for n in range(2)]
    for db in dbs:
        await db.start()
    try:
        peaks = await asyncio.gather(*(_fill(db, ROWS // 2) for db in dbs))
    finally:
        for db in dbs:
            await db.close()
    assert max(peaks) <= SQLITE_MEMORY_LIMIT + SLACK
