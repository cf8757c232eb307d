"""The database handle: URL normalisation, engine set-up, and migrations at start-up."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from sluice.store.migrate import require_head, upgrade

log = logging.getLogger(__name__)

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
_SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_MEMORY_LIMIT = 8 * 1024 * 1024
"""Bytes of memory SQLite may keep for the whole process (page caches above all)."""
_WRITE_OPTION = "sluice_write"


def default_database_url(data_dir: Path) -> str:
    """The default store: a SQLite file ``sluice.db`` under ``data_dir``."""
    return f"sqlite+aiosqlite:///{(Path(data_dir) / 'sluice.db').resolve()}"


def normalise_url(url: str) -> URL:
    """``url`` with its driver replaced by the async one (aiosqlite or asyncpg)."""
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use sqlite:///path or postgresql://user@host/db"
        )
    return parsed.set(drivername=driver)


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


class Database:
    """One engine for the process, created by ``start()`` and disposed by ``close()``.

    ``begin()`` opens a write transaction: on SQLite it starts with ``BEGIN IMMEDIATE``
    so writers queue on the database lock (``busy_timeout``) instead of failing when a
    read lock cannot be upgraded. Reads use ``engine.connect()``.
    """

    def __init__(
        self, url: str, *, migrations: Literal["run", "require"] = "run", echo: bool = False
    ) -> None:
        """``migrations``: ``run`` brings the schema to the newest migration at start-up;
        ``require`` never changes it and refuses to start while it is behind (``sluice
        migrate`` runs them, once, before the replicas start)."""
        self.url = normalise_url(url)
        self._migrations = migrations
        self._echo = echo
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.url.get_backend_name()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.start() has not been awaited")
        return self._engine

    @property
    def writer(self) -> AsyncEngine:
        """The engine with write-transaction options; use ``writer.begin()``."""
        if self._writer is None:
            raise RuntimeError("Database.start() has not been awaited")
        return self._writer

    async def start(self) -> None:
        """Create the engine and bring the schema up to the newest migration (or, with
        ``migrations="require"``, check that it is there)."""
        if self._engine is not None:
            return
        self.open()
        try:
            if self._migrations == "run":
                await upgrade(self.writer)
            else:
                await require_head(self.engine)
        except BaseException:
            await self.close()
            raise
        log.info("database ready: %s", self.describe())

    def open(self) -> None:
        """Create the engine without touching the schema (``sluice migrate`` does that)."""
        if self._engine is None:
            engine = self._create_engine()
            self._engine = engine
            self._writer = engine.execution_options(**{_WRITE_OPTION: True})

    def describe(self) -> str:
        """The URL without its password, in the userinfo or in the query string."""
        query = {
            name: "***" if "password" in name.lower() else value
            for name, value in self.url.query.items()
        }
        return self.url.set(query=query).render_as_string(hide_password=True)

    async def close(self) -> None:
        engine, self._engine, self._writer = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    def _create_engine(self) -> AsyncEngine:
        kwargs: dict[str, Any] = {"echo": self._echo, "hide_parameters": True}
        if not _is_memory(self.url):
            # The connection used last goes out first: steady traffic stays on one
            # connection (on SQLite: one aiosqlite thread and one warm page cache), where the
            # default FIFO pool handed each usage batch to the next of five in turn.
            kwargs["pool_use_lifo"] = True
        if self.dialect != "sqlite":
            kwargs["pool_pre_ping"] = True
            return create_async_engine(self.url, **kwargs)
        if _is_memory(self.url):
            kwargs["poolclass"] = StaticPool  # one connection, or each sees its own database
        else:
            assert self.url.database is not None
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine


def _sqlite_on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy, not the driver, decide where transactions begin (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        _set_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # The page cache grows with the usage table up to its size limit, and every pooled
        # connection has its own: bounded per connection (cache_size) and for the whole
        # process (soft_heap_limit: past it, SQLite reuses cache pages instead of allocating
        # more), so the gateway's memory stays flat however many records it writes. Random
        # request ids make the primary-key index's working set the whole index, which no
        # affordable cache holds; a bigger cache saved little (docs/security/memory.md).
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_MEMORY_LIMIT // 1024}")
        cursor.execute(f"PRAGMA soft_heap_limit={SQLITE_MEMORY_LIMIT}")
    finally:
        cursor.close()


def _set_wal(cursor: Any) -> None:
    """Switch to WAL, retrying while another connection holds the lock it needs.

    Several processes opening a new file together contend for that lock, and SQLite answers
    this pragma with "database is locked" at once instead of waiting out busy_timeout.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_on_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
