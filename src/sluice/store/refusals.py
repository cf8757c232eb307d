"""Usage records the database refuses for good, told apart from the database being down,
and the dead-letter file they are set aside in.

A write can fail because the database is unreachable, busy or slow (retry the same records
later: they will go in) or because it refuses the values themselves (a number out of range
for its column, a NULL where none may be, a constraint): retrying those records can never
succeed, and retrying their whole batch forever would stop every later record behind them.
Only the second kind is "refused for good"; anything not known to be that kind is retried,
so an unfamiliar outage never sends good records to the dead-letter file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy.exc

from sluice.store.usage import UsageRecord

log = logging.getLogger(__name__)

# SQLSTATE classes (PostgreSQL, through asyncpg's ``sqlstate``): 22 data exception (e.g.
# 22003 numeric value out of range), 23 integrity constraint violation (e.g. 23502 not null).
_REFUSED_SQLSTATE_CLASSES = ("22", "23")
# Raised before or by the driver for values it cannot bind or encode: Python's sqlite3
# for integers beyond 64 bits (OverflowError), orjson for the same on PostgreSQL's path.
_REFUSED_TYPES: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    OverflowError,
    orjson.JSONEncodeError,
    sqlalchemy.exc.IntegrityError,
    sqlalchemy.exc.DataError,
)


def refused_for_good(exc: BaseException) -> bool:
    """True when ``exc`` says the database refused the records' values (retrying the same
    records cannot help); False for everything else (connection errors, timeouts, locks,
    unknown errors), which is retried."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:  # the error itself, or what it wraps
        if isinstance(current, _REFUSED_TYPES):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _REFUSED_SQLSTATE_CLASSES:
            return True
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
        current = orig if isinstance(orig, BaseException) else current.__cause__
        seen += 1
    return False


class DeadLetters:
    """Appends refused records to a JSON-lines file (one object a line: ``record`` as the
    spool writes it, ``error``, ``at``); several processes may append to one file (each
    line goes out in one write to a file opened for appending)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def add(self, record: UsageRecord, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        line = json.dumps(
            {"record": _as_json(record), "error": reason, "at": _now_iso()},
            separators=(",", ":"),
            default=repr,
        )
        if self.path is None:
            log.error("usage record refused by the database (%s), no dead-letter file: %s",
                      reason, line)  # fmt: skip
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            log.exception(
                "could not write the dead-letter file %s; the record: %s", self.path, line
            )
            return
        log.error(
            "usage record %s refused by the database (%s): set aside in %s",
            record.request_id,
            reason,
            self.path,
        )


def _as_json(record: UsageRecord) -> dict[str, Any]:
    try:
        return record.to_json()
    except (ValueError, TypeError, OverflowError):  # e.g. a time out of datetime's range
        return dict(record._asdict())


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
