from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sluice.keys.store import KeyRecord, KeyStore
from sluice.store.database import Database
from sluice.store.recorder import UsageRecorder
from sluice.store.usage import UsageRecord, UsageStore, micros

NOW = datetime(2025, 3, 5, 10, 0, tzinfo=UTC)


class FlakyStore:
    """Wraps a real store: counts calls, and fails while ``failing`` is set."""

    def __init__(self, inner: UsageStore, *, failing: bool = False) -> None:
        self.inner = inner
        self.failing = failing
        self.calls: list[int] = []
        self.failed_calls = 0

    async def insert_many(self, records: Sequence[UsageRecord]) -> int:
        self.calls.append(len(records))
        if self.failing:
            self.failed_calls += 1
            raise ConnectionError("database is down")
        return await self.inner.insert_many(records)


def records(n: int, prefix: str = "r", cost: float = 0.01) -> list[UsageRecord]:
    return [
        UsageRecord(request_id=f"{prefix}{i}", model="m", key_id="key_a", cost_usd=cost,
                    created_us=micros(NOW))
        for i in range(n)
    ]  # fmt: skip


def write_spool(path: Path, recs: list[UsageRecord], tail: str = "") -> None:
    """A spool file as the recorder writes it (JSON lines), plus ``tail`` verbatim."""
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs) + tail)


async def spend(db: Database, key_id: str = "key_a") -> float:
    key = await KeyStore(db).get(key_id)
    assert key is not None
    return key.spend_usd


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` (the recorder has no event to wait on from outside)."""
    for _ in range(int(within / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not met within {within}s")


async def test_many_records_are_written_in_few_batches(db: Database) -> None:
    flaky = FlakyStore(UsageStore(db))
    recorder = UsageRecorder(flaky, batch_size=100, flush_interval=30)
    await recorder.start()
    for r in records(1000):
        recorder.record(r)  # plain call: nothing to await on the request path
    await wait_until(lambda: recorder.written == 1000)  # full batches don't wait the interval
    # A backlog is written in batches of up to 10 x batch_size: one write here.
    assert flaky.calls == [1000]
    assert recorder.pending == 0
    await recorder.close()
    assert await UsageStore(db).count() == 1000


async def test_partial_batch_is_flushed_after_the_interval(db: Database) -> None:
    recorder = UsageRecorder(UsageStore(db), batch_size=500, flush_interval=0.05)
    await recorder.start()
    for r in records(3):
        recorder.record(r)
    assert recorder.pending == 3
    await wait_until(lambda: recorder.written == 3)
    assert await UsageStore(db).count() == 3
    await recorder.close()


async def test_the_writer_reports_its_backlog_and_last_write(db: Database) -> None:
    seen: list[tuple[int, float | None]] = []
    recorder = UsageRecorder(
        UsageStore(db), batch_size=500, flush_interval=0.02,
        on_progress=lambda pending, last: seen.append((pending, last)),
    )  # fmt: skip
    await recorder.start()
    for r in records(3):
        recorder.record(r)
    await wait_until(lambda: recorder.written == 3)
    await wait_until(lambda: seen[-1][1] is not None)
    assert (3, None) in seen  # waiting, before the first write
    assert seen[-1][0] == 0
    await recorder.close()


async def test_failed_writes_retry_with_backoff_and_lose_nothing(db: Database) -> None:
    await KeyStore(db).create(KeyRecord(id="key_a", key_hash="h", display="d", created_at=NOW))
    flaky = FlakyStore(UsageStore(db), failing=True)
    errors: list[Exception] = []
    recorder = UsageRecorder(
        flaky, batch_size=50, flush_interval=0.01, on_error=errors.append,
        retry_initial=0.01, retry_max=0.04,
    )  # fmt: skip
    await recorder.start()
    for r in records(120):
        recorder.record(r)
    await wait_until(lambda: flaky.failed_calls >= 5)
    assert recorder.written == 0
    assert recorder.pending == 120  # the failing batch is kept, not dropped
    assert len(errors) == flaky.failed_calls
    assert all(isinstance(e, ConnectionError) for e in errors)

    flaky.failing = False
    await wait_until(lambda: recorder.written == 120)
    await recorder.close()
    assert await UsageStore(db).count() == 120
    assert await spend(db) == pytest.approx(1.2)  # retried batches charged exactly once


async def test_close_drains_everything_buffered(db: Database) -> None:
    recorder = UsageRecorder(UsageStore(db), batch_size=64, flush_interval=60)
    await recorder.start()
    for r in records(300):
        recorder.record(r)
    await recorder.close(timeout=5)
    assert recorder.pending == 0
    assert recorder.written == 300
    assert await UsageStore(db).count() == 300


async def test_close_without_start_still_drains(db: Database) -> None:
    recorder = UsageRecorder(UsageStore(db))
    for r in records(5):
        recorder.record(r)
    await recorder.close()
    assert await UsageStore(db).count() == 5


async def test_persistent_failure_spools_and_next_start_replays(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await KeyStore(db).create(KeyRecord(id="key_a", key_hash="h", display="d", created_at=NOW))
    spool = tmp_path / "spool" / "usage.jsonl"
    flaky = FlakyStore(UsageStore(db), failing=True)
    recorder = UsageRecorder(
        flaky, batch_size=10, flush_interval=0.01, spool_path=spool,
        retry_initial=0.01, retry_max=0.02,
    )  # fmt: skip
    await recorder.start()
    for r in records(25):
        recorder.record(r)
    await wait_until(lambda: flaky.failed_calls >= 2)
    with caplog.at_level(logging.ERROR, logger="sluice.store.recorder"):
        await recorder.close(timeout=0.1)
    assert "spooled 25 usage records" in caplog.text
    lines = spool.read_text().splitlines()
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(
        r.request_id for r in records(25)
    )
    assert recorder.pending == 0
    assert recorder.written == 0
    assert await UsageStore(db).count() == 0

    # Some may have reached the database already (committed, then the reply was lost):
    # the replay must neither duplicate them nor charge them twice.
    await UsageStore(db).insert_many(records(5))

    flaky.failing = False
    restarted = UsageRecorder(flaky, spool_path=spool)
    await restarted.start()  # replays before accepting new work
    assert not spool.exists()
    assert await UsageStore(db).count() == 25
    assert await spend(db) == pytest.approx(0.25)
    await restarted.close()


async def test_replay_that_fails_at_start_is_retried_in_the_background(
    db: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "usage.jsonl"
    write_spool(spool, records(3), tail="{torn line\n")
    flaky = FlakyStore(UsageStore(db), failing=True)
    errors: list[Exception] = []
    recorder = UsageRecorder(
        flaky, spool_path=spool, on_error=errors.append, retry_initial=0.01, retry_max=0.02
    )
    await recorder.start()  # does not fail the app's start-up
    assert errors
    replay = spool.with_name(spool.name + ".replay")
    assert replay.exists()  # the spool, renamed while it is replayed
    assert recorder.pending == 3
    flaky.failing = False
    await wait_until(lambda: not replay.exists() and not spool.exists())
    assert await UsageStore(db).count() == 3
    await recorder.close()


async def test_record_after_close_goes_to_the_spool(db: Database, tmp_path: Path) -> None:
    spool = tmp_path / "usage.jsonl"
    recorder = UsageRecorder(UsageStore(db), spool_path=spool)
    await recorder.start()
    await recorder.close()
    recorder.record(records(1, prefix="late")[0])
    assert json.loads(spool.read_text())["request_id"] == "late0"


async def test_long_outage_spills_to_the_spool_and_replays_when_the_database_is_back(
    db: Database, tmp_path: Path
) -> None:
    await KeyStore(db).create(KeyRecord(id="key_a", key_hash="h", display="d", created_at=NOW))
    spool = tmp_path / "usage.jsonl"
    flaky = FlakyStore(UsageStore(db), failing=True)
    recorder = UsageRecorder(
        flaky, batch_size=10, flush_interval=0.01, spool_path=spool, max_buffered=50,
        retry_initial=0.01, retry_max=0.02,
    )  # fmt: skip
    await recorder.start()
    for r in records(400):
        recorder.record(r)
        assert len(recorder._buffer) <= 50  # memory stays bounded during the outage
    assert spool.exists()
    spilled = len(spool.read_text().splitlines())
    assert spilled >= 300
    assert recorder.pending + spilled == 400  # nothing lost, nothing counted twice

    flaky.failing = False
    replay = spool.with_name(spool.name + ".replay")  # the spool while it is replayed
    await wait_until(lambda: recorder.pending == 0 and not spool.exists() and not replay.exists())
    assert await UsageStore(db).count() == 400
    assert await spend(db) == pytest.approx(4.0)
    await recorder.close()


async def test_a_replay_cut_short_is_finished_by_the_next_start(
    db: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "usage.jsonl"
    replay = tmp_path / "usage.jsonl.replay"
    write_spool(replay, records(3, "a"))
    write_spool(spool, records(2, "b"))
    recorder = UsageRecorder(UsageStore(db), spool_path=spool)
    await recorder.start()
    assert not replay.exists()
    assert not spool.exists()
    assert await UsageStore(db).count() == 5
    await recorder.close()


def test_buffer_limit_must_hold_a_batch() -> None:
    with pytest.raises(ValueError, match="max_buffered"):
        UsageRecorder(FlakyStore(None), batch_size=100, max_buffered=10)  # type: ignore[arg-type]


async def test_records_spilled_while_the_start_up_replay_fails_are_kept(
    db: Database, tmp_path: Path
) -> None:
    spool = tmp_path / "usage.jsonl"
    write_spool(spool, records(5, "old"))
    flaky = FlakyStore(UsageStore(db), failing=True)
    recorder = UsageRecorder(
        flaky, batch_size=10, flush_interval=0.01, spool_path=spool, max_buffered=50,
        retry_initial=0.01, retry_max=0.02,
    )  # fmt: skip
    await recorder.start()  # the replay fails: the writer keeps retrying it
    for r in records(400, "new"):
        recorder.record(r)  # spills to a new spool file meanwhile
    assert spool.exists()
    flaky.failing = False
    replay = spool.with_name(spool.name + ".replay")
    await wait_until(lambda: recorder.pending == 0 and not spool.exists() and not replay.exists())
    assert await UsageStore(db).count() == 405
    await recorder.close()


def test_spool_lines_keep_their_format() -> None:
    # A line as spools were written before records carried created_us, and the same line
    # written now: both read back as the same record, to the microsecond.
    line = (
        '{"request_id":"r1","model":"m","key_id":"key_a","deployment":null,'
        '"prompt_tokens":3,"completion_tokens":4,"cost_usd":0.5,"latency_ms":1.25,'
        '"status":200,"cache_hit":false,"stream":true,'
        '"created_at":"2025-03-05T10:00:00.000007+00:00"}'
    )
    record = UsageRecord.from_json(json.loads(line))
    assert record.created_us == micros(NOW) + 7
    assert record.created_at == NOW.replace(microsecond=7)
    assert record.client_request_id is None  # older lines have no client id
    assert record.to_json() == {**json.loads(line), "client_request_id": None, "batch_id": None}
    assert UsageRecord.from_json(record.to_json()) == record
