"""The usage writer under failure (issue 18, point 9): a record the database refuses for
good is set aside without stopping the rest; an outage is still retried; a writer that dies
is restarted. On SQLite and, when reachable, PostgreSQL (the ``db`` fixture)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from sluice.store import recorder as recorder_module
from sluice.store.database import Database
from sluice.store.recorder import UsageRecorder
from sluice.store.refusals import refused_for_good
from sluice.store.usage import UsageRecord, UsageStore
from tests.store.test_recorder import FlakyStore, records, wait_until, write_spool


def bad_records(db: Database) -> list[UsageRecord]:
    """Records this database refuses whatever the retry: PostgreSQL's int4 column cannot
    hold 2**40 prompt tokens; SQLite stores 64-bit integers, so 2**64 (which Python's
    sqlite3 cannot bind), and a NULL model on both (NOT NULL)."""
    base = records(1, prefix="bad")[0]
    if db.engine.dialect.name == "postgresql":
        too_big = base._replace(request_id="bad-int4", prompt_tokens=2**40)
    else:
        too_big = base._replace(request_id="bad-int64", prompt_tokens=2**64)
    no_model = base._replace(request_id="bad-null", model=None)  # type: ignore[arg-type]
    return [too_big, no_model]


async def test_a_refused_record_is_set_aside_and_the_rest_are_written(
    db: Database, tmp_path: Path
) -> None:
    dead = tmp_path / "usage-dead-letter.jsonl"
    counted: list[int] = []
    errors: list[Exception] = []
    recorder = UsageRecorder(
        UsageStore(db), batch_size=50, flush_interval=0.01, retry_initial=0.01,
        dead_letter_path=dead, on_dead_letter=counted.append, on_error=errors.append,
    )  # fmt: skip
    await recorder.start()
    good = records(40)
    bad = bad_records(db)
    for rec in [*good[:13], bad[0], *good[13:30], bad[1], *good[30:]]:
        recorder.record(rec)
    await wait_until(lambda: recorder.written == 40, within=10)
    await recorder.close()

    assert await UsageStore(db).count() == 40
    lines = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(line["record"]["request_id"] for line in lines) == sorted(
        r.request_id for r in bad
    )
    assert all(line["error"] and line["at"] for line in lines)
    assert (recorder.dead_lettered, sum(counted)) == (2, 2)
    assert errors == []  # set aside at once, not retried as an outage


async def test_a_refused_record_in_the_spool_does_not_block_its_replay(
    db: Database, tmp_path: Path
) -> None:
    spool, dead = tmp_path / "spool.jsonl", tmp_path / "dead.jsonl"
    bad = bad_records(db)[1:]  # the NULL model: JSON can carry it to the spool and back
    write_spool(spool, [*records(30), *bad])
    recorder = UsageRecorder(
        UsageStore(db), spool_path=spool, dead_letter_path=dead, retry_initial=0.01
    )
    await recorder.start()
    await wait_until(lambda: recorder.written == 30, within=10)
    await recorder.close()
    assert await UsageStore(db).count() == 30
    assert not spool.exists()
    assert len(dead.read_text().splitlines()) == 1


class Outage(Exception):
    """What an asyncpg connection failure looks like: SQLSTATE class 08."""

    sqlstate = "08006"


class RefusingStore:
    """A sink that refuses (for good) any batch holding one of ``refused``, and fails as
    an outage while ``down``."""

    def __init__(self, inner: UsageStore, refused: set[str]) -> None:
        self.inner = inner
        self.refused = refused
        self.down = False
        self.calls = 0

    async def insert_many(self, records: Sequence[UsageRecord]) -> int:
        self.calls += 1
        if self.down:
            raise Outage("connection to server was lost")
        if any(r.request_id in self.refused for r in records):
            error = Exception("value out of range for type integer")
            error.sqlstate = "22003"  # type: ignore[attr-defined]
            raise error
        return await self.inner.insert_many(records)


async def test_an_outage_is_retried_not_set_aside(db: Database, tmp_path: Path) -> None:
    store = RefusingStore(UsageStore(db), refused={"r7"})
    store.down = True
    dead = tmp_path / "dead.jsonl"
    errors: list[Exception] = []
    recorder = UsageRecorder(
        store, batch_size=100, flush_interval=0.01, retry_initial=0.01, retry_max=0.02,
        dead_letter_path=dead, on_error=errors.append,
    )  # fmt: skip
    await recorder.start()
    for rec in records(100):
        recorder.record(rec)
    await wait_until(lambda: len(errors) >= 5)
    assert not dead.exists()  # down is not "refused": nothing set aside
    store.down = False
    await wait_until(lambda: recorder.written == 99)
    await recorder.close()
    assert await UsageStore(db).count() == 99
    assert [json.loads(line)["record"]["request_id"] for line in dead.read_text().splitlines()] == [
        "r7"
    ]
    # Bisection: about two writes per halving of the 100-record batch, not one per record.
    assert store.calls - len(errors) <= 2 * 7 + 1


def test_what_counts_as_refused_for_good() -> None:
    import sqlite3

    import sqlalchemy.exc

    assert refused_for_good(sqlite3.IntegrityError("NOT NULL constraint failed"))
    assert refused_for_good(OverflowError("Python int too large to convert to SQLite INTEGER"))
    wrapped = sqlalchemy.exc.DBAPIError("INSERT", {}, Exception("wrapped"))
    wrapped.orig.sqlstate = "23505"  # type: ignore[union-attr]
    assert refused_for_good(wrapped)
    for outage in (
        Outage("gone"),
        ConnectionError("refused"),
        TimeoutError(),
        sqlite3.OperationalError("database is locked"),
        RuntimeError("unknown"),
    ):
        assert not refused_for_good(outage)


async def test_a_writer_that_dies_is_restarted(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error reading the spool used to kill the writer for good: nothing written
    after it. Now the writer restarts (counted, logged), writes what arrived, and replays
    the spool once it can be read."""
    spool = tmp_path / "spool.jsonl"
    write_spool(spool, records(5, prefix="spooled"))
    real = recorder_module._SpoolReader.next_chunk
    broken = {"left": 2}  # the replay at start, then the writer's first attempt

    def next_chunk(self: recorder_module._SpoolReader) -> list[UsageRecord]:
        if broken["left"]:
            broken["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(self)

    monkeypatch.setattr(recorder_module._SpoolReader, "next_chunk", next_chunk)
    restarts: list[None] = []
    recorder = UsageRecorder(
        FlakyStore(UsageStore(db)), batch_size=10, flush_interval=0.01, spool_path=spool,
        retry_initial=0.01, on_restart=lambda: restarts.append(None),
    )  # fmt: skip
    caplog.set_level(logging.ERROR, logger="sluice.store.recorder")
    await recorder.start()
    for rec in records(20):
        recorder.record(rec)
    await wait_until(lambda: recorder.written >= 20)
    recorder.record(records(1, prefix="later")[0])  # the next write replays the spool
    await wait_until(lambda: recorder.written >= 26)
    await recorder.close()
    assert await UsageStore(db).count() == 26
    assert (recorder.restarts, len(restarts)) == (1, 1)
    assert "usage writer failed; restarting" in caplog.text
    assert not spool.exists()
