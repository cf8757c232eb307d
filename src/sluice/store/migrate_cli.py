"""What ``sluice migrate`` does: wait for the database, then bring its schema to this
release's, or (``--check``) wait until someone has.

Meant for a one-shot migrations job before the replicas start (replicas then run with
``migrations: require``): several migrators at once are safe, the PostgreSQL advisory lock in
`sluice.store.migrate.upgrade` lets one work and the others find nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import text

from sluice.services import database_for
from sluice.settings import Settings
from sluice.store.database import Database
from sluice.store.migrate import current_revision, head_revision, known_revisions, upgrade

log = logging.getLogger("sluice.migrate")
_RETRY_SECONDS = 1.0


class MigrateFailed(Exception):
    """The reason ``sluice migrate`` exits non-zero; ``exit_code`` says which."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def migrate(settings: Settings, wait: float, check_only: bool) -> str:
    """Upgrade the schema to head (or check it is there) and say what was done."""
    database = database_for(settings)
    database.open()
    try:
        deadline = time.monotonic() + wait
        await _wait_for_database(database, deadline)
        head = head_revision()
        if check_only:
            return await _wait_for_head(database, head, deadline)
        before = await current_revision(database.engine)
        if before is not None and before not in known_revisions():
            raise MigrateFailed(
                f"the database schema is at {before}, which this Sluice does not know (a newer "
                f"release migrated it): nothing was changed"
            )
        try:
            before = await upgrade(database.writer)
        except Exception as exc:
            log.exception("migration failed")
            raise MigrateFailed(
                f"migrating from {before or 'nothing'} to {head} failed (nothing was changed: "
                f"one transaction): {type(exc).__name__}: {exc}"
            ) from None
        after = await current_revision(database.engine)
        if after != head:  # pragma: no cover - alembic raises before this can happen
            raise MigrateFailed(f"the schema is at {after} after migrating, not {head}")
        if before == after:
            return f"{database.describe()}: schema already at {head}"
        return f"{database.describe()}: schema migrated from {before or 'nothing'} to {head}"
    finally:
        await database.close()


async def _wait_for_database(database: Database, deadline: float) -> None:
    """Retry until the database answers, or raise with the last error at ``deadline``."""
    while True:
        try:
            async with database.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return
        except Exception as exc:
            if time.monotonic() + _RETRY_SECONDS > deadline:
                raise MigrateFailed(
                    f"the database at {database.describe()} did not answer: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.info("waiting for the database at %s: %s", database.describe(), exc)
            await asyncio.sleep(_RETRY_SECONDS)


async def _wait_for_head(database: Database, head: str, deadline: float) -> str:
    known = known_revisions()
    while True:
        current = await current_revision(database.engine)
        if current == head:
            return f"{database.describe()}: schema at {head}"
        if current is not None and current not in known:
            return f"{database.describe()}: schema at {current}, newer than this Sluice's {head}"
        if time.monotonic() + _RETRY_SECONDS > deadline:
            raise MigrateFailed(
                f"the database schema is at {current or 'nothing'}, not {head}: "
                "run `sluice migrate`",
                exit_code=3,
            )
        await asyncio.sleep(_RETRY_SECONDS)
