"""Running the packaged Alembic migrations programmatically, with no alembic.ini."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("sluice.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same for every Sluice replica.
_PG_MIGRATION_LOCK = 0x51C1CE
_PG_LOCK_TIMEOUT = "5s"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations, bound to ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` in one transaction; a no-op when already there.
    Returns the revision found once the lock was held (None: an empty database).

    On PostgreSQL a transaction-scoped advisory lock serialises replicas that start
    together; on SQLite the write transaction (``BEGIN IMMEDIATE`` when ``engine`` is
    ``Database.writer``) does the same.
    """
    async with engine.begin() as conn:
        return await conn.run_sync(_run, "upgrade", revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Step the schema back to ``revision`` (``"base"`` drops everything)."""
    async with engine.begin() as conn:
        await conn.run_sync(_run, "downgrade", revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None before the first migration."""
    async with engine.connect() as conn:
        return await conn.run_sync(_revision_of)


def _revision_of(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest packaged migration: the schema this Sluice is written for."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the packaged migrations have no head"
    return head


def is_newer(revision: str | None) -> bool:
    """A revision none of the packaged migrations has: a later release's (it ran its
    migrations during a rolling upgrade, or before a rollback to this one)."""
    return revision is not None and revision not in _packaged_revisions()


@functools.cache
def _packaged_revisions() -> frozenset[str]:
    scripts = ScriptDirectory.from_config(alembic_config()).walk_revisions()
    return frozenset(script.revision for script in scripts)


class SchemaBehind(RuntimeError):
    """The database's schema is older than this Sluice's (``migrations: require``)."""


async def require_head(engine: AsyncEngine) -> None:
    """Raise `SchemaBehind` unless the schema is at this Sluice's newest migration.

    A revision this Sluice does not know is a newer one (a replica of the previous release
    during a rolling upgrade, after the next release's migrations ran): it is let through
    with a warning, which is why every migration must leave the schema usable by the
    release before it (docs/deployment.md, upgrades)."""
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return
    if is_newer(current):
        log.warning(
            "the database schema is at %s, newer than this Sluice's %s: running on it",
            current,
            head,
        )
        return
    raise SchemaBehind(
        f"the database schema is at {current or 'nothing (an empty database)'}, this Sluice "
        f"needs {head}, and migrations are set to 'require': run `sluice migrate` first"
    )


def _run(connection: Connection, action: str, revision: str) -> str | None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        # Taken after the advisory lock (which may rightly wait for another migrator): a
        # table lock that waits behind live replicas' transactions would queue every later
        # query on that table behind it, so give up instead, loudly, and let the job retry.
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{_PG_LOCK_TIMEOUT}'")
    found = _revision_of(connection)
    config = alembic_config(connection)
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)
    return found
