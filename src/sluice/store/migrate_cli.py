"""What ``sluice migrate`` does: wait for the database, then bring its schema to this
release's, or (``--check``) wait until someone has.

Meant for a one-shot migrations job before the replicas start (replicas then run with
``migrations: require``): several migrators at once are safe, the PostgreSQL advisory lock in
`sluice.store.migrate.upgrade` lets one work and the others find nothing left to do.

Only a database that cannot be reached yet is waited for (refused, unreachable, starting
up): a wrong password, a missing database or a bad URL fails at once, not after ``--wait``.
A schema newer than this release's is left alone with a warning and exit 0, as the replicas
accept it: rolling back to the previous image must not be blocked by its migrations job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sluice.services import database_for
from sluice.settings import Settings
from sluice.store.database import Database
from sluice.store.migrate import current_revision, head_revision, is_newer, upgrade

T = TypeVar("T")
log = logging.getLogger("sluice.migrate")
_RETRY_SECONDS = 1.0
# asyncpg's errors for a server that is there but not taking connections yet.
_NOT_YET = frozenset(
    {"CannotConnectNowError", "TooManyConnectionsError", "ConnectionDoesNotExistError"}
)


class MigrateFailed(Exception):
    """The reason ``sluice migrate`` exits non-zero; ``exit_code`` says which."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def migrate(settings: Settings, wait: float, check_only: bool) -> str:
    """Upgrade the schema to head (or check it is there) and say what was done."""
    try:
        database = database_for(settings)
        database.open()
    except Exception as exc:  # a malformed URL or an unknown driver
        raise MigrateFailed(f"the database URL cannot be used: {exc}") from None
    try:
        deadline = time.monotonic() + wait
        head = head_revision()
        if check_only:
            return await _wait_for_head(database, head, deadline)
        before = await _until_reachable(
            database, deadline, lambda: current_revision(database.engine)
        )
        if is_newer(before):
            log.warning("the schema is at %s, newer than this release's %s", before, head)
            return (
                f"{database.describe()}: schema at {before}, newer than this release's "
                f"{head}: nothing to do"
            )
        try:
            before = await upgrade(database.writer)
        except Exception as exc:
            log.exception("migration failed")
            raise MigrateFailed(
                f"migrating from {before or 'nothing'} to {head} failed (nothing was changed: "
                f"one transaction): {type(exc).__name__}: {exc}"
            ) from None
        if before == head:
            return f"{database.describe()}: schema already at {head}"
        return f"{database.describe()}: schema migrated from {before or 'nothing'} to {head}"
    finally:
        await database.close()


async def _until_reachable(
    database: Database, deadline: float, work: Callable[[], Awaitable[T]]
) -> T:
    """``work()``, retried while the database cannot be reached yet, until ``deadline``."""
    while True:
        try:
            return await work()
        except Exception as exc:
            if not _not_reachable_yet(exc):
                raise MigrateFailed(
                    f"the database at {database.describe()} refused: "
                    f"{type(_innermost(exc)).__name__}: {_innermost(exc)}"
                ) from None
            if time.monotonic() + _RETRY_SECONDS > deadline:
                raise MigrateFailed(
                    f"the database at {database.describe()} did not answer: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.info("waiting for the database at %s: %s", database.describe(), exc)
            await asyncio.sleep(_RETRY_SECONDS)


async def _wait_for_head(database: Database, head: str, deadline: float) -> str:
    while True:
        current = await _until_reachable(
            database, deadline, lambda: current_revision(database.engine)
        )
        if current == head:
            return f"{database.describe()}: schema at {head}"
        if is_newer(current):
            return f"{database.describe()}: schema at {current}, newer than this Sluice's {head}"
        if time.monotonic() + _RETRY_SECONDS > deadline:
            raise MigrateFailed(
                f"the database schema is at {current or 'nothing'}, not {head}: "
                "run `sluice migrate`",
                exit_code=3,
            )
        await asyncio.sleep(_RETRY_SECONDS)


def _innermost(exc: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrappers."""
    while (inner := getattr(exc, "orig", None) or exc.__cause__) is not None:
        exc = inner
    return exc


def _not_reachable_yet(exc: BaseException) -> bool:
    """Refused, unreachable, unresolvable or still starting: worth waiting for. Not a
    wrong password, a missing database or a bad option, which no wait will mend."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError | TimeoutError) or type(seen).__name__ in _NOT_YET:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False
