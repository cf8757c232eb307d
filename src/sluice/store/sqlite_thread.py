"""Run a function against an aiosqlite connection's sqlite3 connection: Sluice's one reach
into aiosqlite's private API.

aiosqlite keeps each sqlite3 connection on a thread of its own and sends every call there
and back: a thread wake-up and an event-loop turn per statement (three or four for a
cursor). The usage writer's batch is a transaction of several statements, so it runs as
one plain function on that thread, one hop in all. aiosqlite has no public call for that;
its private ``Connection._execute`` (what its own methods queue their work with) and
``_conn`` (the sqlite3 connection) do it, and their meaning can change in any release.

`SqliteThread` therefore checks at start-up that the installed aiosqlite is in
``AIOSQLITE_RANGE`` (`sluice.versions`; pyproject.toml pins the same range). When it is
not, it falls back to aiosqlite's public methods: the same function runs on a worker
thread, each statement it makes handed to aiosqlite's ``execute_fetchall`` /
``executemany`` and waited for, with a logged warning. That fallback is safe (the same
statements, in the same order, in the same transaction, on the same connection; the
batch only costs more hops), so unlike uvicorn's adapter this one never refuses to start.
tests/store/test_sqlite_thread.py runs the usage writer both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import aiosqlite

from sluice.versions import Covered

AIOSQLITE_RANGE = Covered("aiosqlite", (0, 20), (0, 23))
"""aiosqlite releases whose ``Connection._execute`` and ``_conn`` this module was tested on."""

log = logging.getLogger("sluice.store")

A = TypeVar("A")
T = TypeVar("T")


class Rows(Protocol):
    def fetchall(self) -> list[Any]: ...


class SqliteConnection(Protocol):
    """What a function run by `SqliteThread` may use: a part of ``sqlite3.Connection``."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Rows: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> object: ...

    @property
    def in_transaction(self) -> bool: ...


class SqliteThread:
    """Runs ``fn(connection, *args)`` for an aiosqlite connection (see the module).

    ``private`` picks the path: None (the default) checks the installed aiosqlite and
    takes the private call where it is covered; False forces the public fallback (tests).
    """

    def __init__(self, *, private: bool | None = None) -> None:
        if private is None:
            installed = AIOSQLITE_RANGE.installed()
            private = installed is not None and AIOSQLITE_RANGE.covers(installed)
            if not private:
                log.warning(
                    "aiosqlite %s is not in %s, the range sluice.store.sqlite_thread was "
                    "tested with: usage batches go through aiosqlite's public methods, one "
                    "hop to its thread per statement (slower, same results)",
                    installed,
                    AIOSQLITE_RANGE,
                )
        self.private = private

    async def run(
        self, driver: aiosqlite.Connection, fn: Callable[[SqliteConnection, A], T], arg: A
    ) -> T:
        """``fn(connection, arg)``'s result, where ``connection`` is ``driver``'s sqlite3
        connection (on aiosqlite's thread) or, in the fallback, a `_Forwarding` to it.

        Cancelling the caller does not stop ``fn``: on the private path it goes on, on
        aiosqlite's thread, ahead of whatever is queued for the connection after it; the
        fallback keeps that order by waiting for ``fn`` to end before it passes the
        cancellation on (else the caller would hand the connection back to its pool, whose
        rollback would land between ``fn``'s statements)."""
        if self.private:
            return await driver._execute(fn, driver._conn, arg)  # type: ignore[no-untyped-call,no-any-return]
        forwarding = _Forwarding(driver, asyncio.get_running_loop())
        work = asyncio.ensure_future(asyncio.to_thread(fn, forwarding, arg))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({work})
            if not work.cancelled():
                work.exception()  # retrieved: the caller sees its cancellation instead
            raise


class _Forwarding:
    """The fallback's stand-in for the sqlite3 connection, used on a worker thread: each
    statement is sent to aiosqlite's thread through its public methods, and the worker
    waits for the answer (sqlite3 errors included), so ``fn`` runs as it would there."""

    def __init__(self, driver: aiosqlite.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._driver = driver
        self._loop = loop

    def execute(self, sql: str, parameters: Any = (), /) -> _Fetched:
        return _Fetched(self._wait(self._fetch(sql, parameters)))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> None:
        self._wait(self._many(sql, list(parameters)))

    @property
    def in_transaction(self) -> bool:
        return self._driver.in_transaction

    async def _fetch(self, sql: str, parameters: Any) -> list[Any]:
        return list(await self._driver.execute_fetchall(sql, parameters))

    async def _many(self, sql: str, parameters: list[Any]) -> None:
        async with self._driver.executemany(sql, parameters):
            pass  # closes the cursor

    def _wait(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()


class _Fetched:
    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchall(self) -> list[Any]:
        return self._rows
