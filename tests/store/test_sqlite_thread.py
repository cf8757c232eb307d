"""The usage writer's way onto aiosqlite's thread (`sluice.store.sqlite_thread`): the
version check, and the public fallback running the same batches as the private call.

tests/store/test_usage.py runs every scenario on the path the installed aiosqlite gets
(the private call, where it is covered); here the writing scenarios run again with the
fallback forced.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from sluice.store import sqlite_thread, usage
from sluice.store.database import Database
from sluice.store.sqlite_thread import SqliteConnection, SqliteThread
from sluice.versions import Covered
from tests.store import test_usage

WRITING_SCENARIOS: list[Callable[[Database], Awaitable[None]]] = [
    test_usage.test_replaying_a_batch_stores_and_charges_it_once,
    test_usage.test_a_failed_batch_changes_nothing_and_the_next_one_is_written,
    test_usage.test_a_batch_larger_than_one_statement_is_stored_and_charged_once,
    test_usage.test_a_batch_refused_for_another_reason_raises_and_stores_nothing,
    test_usage.test_concurrent_batches_charge_exactly,
    test_usage.test_every_column_round_trips,
    test_usage.test_large_batch_partly_replayed,
    test_usage.test_lifetime_and_periodic_keys_in_one_batch,
    test_usage.test_daily_spend_resets_at_the_period_boundary,
]


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'sluice.db'}")
    await database.start()
    try:
        yield database
    finally:
        await database.close()


def test_the_installed_aiosqlite_takes_the_private_call() -> None:
    """The version the tests run on is covered (tests/test_versions.py says so loudly)."""
    assert SqliteThread().private
    assert hasattr(aiosqlite.Connection, "_execute")
    assert isinstance(aiosqlite.Connection._conn, property)


def test_an_uncovered_aiosqlite_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_thread, "AIOSQLITE_RANGE", Covered("aiosqlite", (9, 0), (9, 1)))
    with caplog.at_level(logging.WARNING, logger="sluice.store"):
        thread = SqliteThread()
    assert not thread.private
    assert "aiosqlite>=9.0,<9.1" in caplog.text
    assert "public methods" in caplog.text


@pytest.mark.parametrize("scenario", WRITING_SCENARIOS, ids=lambda f: f.__name__[5:])
async def test_the_usage_writer_through_the_public_fallback(
    scenario: Callable[[Database], Awaitable[None]],
    sqlite_db: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[SqliteThread] = []

    def forced() -> SqliteThread:
        made.append(SqliteThread(private=False))
        return made[-1]

    forwarded: list[str] = []
    fetch = aiosqlite.Connection.execute_fetchall

    def spy(self: aiosqlite.Connection, sql: str, parameters: Any = None) -> Any:
        forwarded.append(sql)
        return fetch(self, sql, parameters)

    monkeypatch.setattr(usage, "SqliteThread", forced)
    monkeypatch.setattr(aiosqlite.Connection, "execute_fetchall", spy)
    await scenario(sqlite_db)
    assert made
    assert not any(thread.private for thread in made)
    assert "BEGIN IMMEDIATE" in forwarded  # the batches went through the public methods


def _blocking_batch(
    started: threading.Event,
    go_on: threading.Event,
    finished: threading.Event,
    sqlite: SqliteConnection,
    n: int,
) -> int:
    sqlite.execute("BEGIN IMMEDIATE")
    sqlite.execute("INSERT INTO t VALUES (?)", (n,))
    started.set()
    go_on.wait(5)
    sqlite.execute("INSERT INTO t VALUES (?)", (n + 1,))
    sqlite.execute("COMMIT")
    finished.set()
    return n


@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
async def test_a_cancelled_caller_does_not_cut_the_function_short(
    tmp_path: Path, private: bool
) -> None:
    """Cancelling the caller leaves the function to finish its transaction before anything
    queued after it reaches the connection (on the fallback, the caller waits for it)."""
    async with aiosqlite.connect(tmp_path / "t.db", isolation_level=None) as driver:
        await driver.execute("CREATE TABLE t (n INTEGER)")
        started, go_on, finished = threading.Event(), threading.Event(), threading.Event()
        thread = SqliteThread(private=private)
        call = asyncio.ensure_future(
            thread.run(driver, partial(_blocking_batch, started, go_on, finished), 1)
        )
        assert await asyncio.to_thread(started.wait, 5)
        call.cancel()
        await asyncio.sleep(0)  # the task takes the cancellation while the function waits
        assert not finished.is_set()
        # The private path's caller ends at once (aiosqlite's queue keeps the order); the
        # fallback holds its caller until the function has ended.
        assert call.done() == private
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert finished.is_set() or private
        # What comes next (a pool's rollback, say) finds the transaction committed whole.
        await driver.rollback()
        assert not driver.in_transaction
        assert await driver.execute_fetchall("SELECT n FROM t ORDER BY n") == [(1,), (2,)]
