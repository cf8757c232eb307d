from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from sluice.keys.store import KeyRecord, KeyStore
from sluice.store.database import Database
from sluice.store.schema import usage_records
from sluice.store.usage import UsageRecord, UsageStore, micros

DAY1 = datetime(2025, 3, 5, 10, 0, tzinfo=UTC)
DAY2 = datetime(2025, 3, 6, 0, 0, 1, tzinfo=UTC)


def rec(request_id: str, **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "request_id": request_id,
        "model": "m1",
        "key_id": "key_a",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 1.0,
        "created_at": DAY1,
    }
    values.update(fields)
    values["created_us"] = micros(values.pop("created_at"))  # type: ignore[arg-type]
    return UsageRecord(**values)  # type: ignore[arg-type]


async def add_key(db: Database, key_id: str = "key_a", **fields: object) -> None:
    values: dict[str, object] = {"id": key_id, "key_hash": f"h-{key_id}", "display": "sk…x"}
    values.update(fields)
    await KeyStore(db).create(KeyRecord(**values))  # type: ignore[arg-type]


async def spend(db: Database, key_id: str = "key_a", now: datetime = DAY1) -> float:
    key = await KeyStore(db).get(key_id, now=now)
    assert key is not None
    return key.spend_usd


def test_record_json_round_trip() -> None:
    record = rec("r1", deployment="d1", cache_hit=True, stream=True, latency_ms=1.5)
    assert UsageRecord.from_json(record.to_json()) == record


async def test_replaying_a_batch_stores_and_charges_it_once(db: Database) -> None:
    await add_key(db, created_at=DAY1)
    store = UsageStore(db)
    batch = [rec(f"r{i}", cost_usd=0.25) for i in range(4)]

    assert await store.insert_many(batch) == 4
    assert await store.insert_many(batch) == 0
    assert await store.insert_many([*batch[:2], rec("r9", cost_usd=0.5)]) == 1
    assert await store.count() == 5
    assert await spend(db) == pytest.approx(1.5)


async def test_a_failed_batch_changes_nothing_and_the_next_one_is_written(
    db: Database,
) -> None:
    """A batch the database refuses (here a NOT NULL column) is rolled back whole, rows and
    spend, and leaves the connection usable for the next batch (on SQLite the transaction
    is the writer's own, on aiosqlite's thread)."""
    await add_key(db, created_at=DAY1)
    store = UsageStore(db)
    with pytest.raises(Exception, match=r"(?i)null"):
        await store.insert_many([rec("ok1", cost_usd=0.5), rec("bad", model=None)])
    assert await store.count() == 0
    assert await spend(db) == 0.0

    assert await store.insert_many([rec("ok1", cost_usd=0.5), rec("ok2", cost_usd=0.25)]) == 2
    assert await store.count() == 2
    assert await spend(db) == pytest.approx(0.75)


async def test_a_batch_larger_than_one_statement_is_stored_and_charged_once(
    db: Database,
) -> None:
    await add_key(db)
    store = UsageStore(db)
    batch = [rec(f"big{i:05d}", cost_usd=0.001) for i in range(2500)]  # 3 statements each
    assert await store.insert_many(batch[1000:1100]) == 100  # some already stored
    assert await store.insert_many(batch) == 2400
    assert await store.count() == 2500
    key = await KeyStore(db).get("key_a")
    assert key is not None
    assert key.spend_usd == pytest.approx(2.5)
    assert await store.insert_many(batch) == 0


async def test_a_batch_refused_for_another_reason_raises_and_stores_nothing(
    db: Database,
) -> None:
    await add_key(db)
    store = UsageStore(db)
    assert await store.insert_many([rec("r0")]) == 1
    # A stored id sends the insert to the look-up; a NULL model then fails it again.
    bad = [rec("r0"), rec("r1"), rec("r2", model=None)]
    with pytest.raises(Exception, match=r"NOT NULL|null value"):
        await store.insert_many(bad)
    assert await store.count() == 1
    assert await spend(db) == pytest.approx(1.0)


async def test_duplicates_inside_one_batch_count_once(db: Database) -> None:
    await add_key(db)
    store = UsageStore(db)
    assert await store.insert_many([rec("r1"), rec("r1"), rec("r2")]) == 2
    assert await store.insert_many([]) == 0
    assert await spend(db) == pytest.approx(2.0)


async def test_spend_accumulates_per_key_and_ignores_unknown_keys(db: Database) -> None:
    await add_key(db, "key_a")
    await add_key(db, "key_b", budget_usd=100.0)
    store = UsageStore(db)
    await store.insert_many(
        [
            rec("r1", key_id="key_a", cost_usd=1.0),
            rec("r2", key_id="key_b", cost_usd=2.0),
            rec("r3", key_id="key_a", cost_usd=0.5),
            rec("r4", key_id="key_config", cost_usd=9.0),  # not in the table
            rec("r5", key_id=None, cost_usd=9.0),
        ]
    )
    await store.insert_many([rec("r6", key_id="key_b", cost_usd=3.0)])
    assert await spend(db, "key_a") == pytest.approx(1.5)
    assert await spend(db, "key_b") == pytest.approx(5.0)
    assert await store.count() == 6


async def test_daily_spend_resets_at_the_period_boundary(db: Database) -> None:
    await add_key(db, budget_usd=10.0, budget_period="daily", created_at=DAY1)
    store = UsageStore(db)
    keys = KeyStore(db)
    await store.insert_many([rec("r1", cost_usd=1.0), rec("r2", cost_usd=2.0)])
    assert await spend(db, now=DAY1) == pytest.approx(3.0)

    # Read after midnight, before anything new is written: lazily rolled over.
    rolled = await keys.get("key_a", now=DAY2)
    assert rolled is not None
    assert rolled.spend_usd == 0.0
    assert rolled.period_started_at == datetime(2025, 3, 6, tzinfo=UTC)
    assert rolled.budget_left(DAY2) == 10.0

    # The write after midnight resets the stored spend in SQL...
    await store.insert_many([rec("r3", cost_usd=0.5, created_at=DAY2)])
    assert await spend(db, now=DAY2) == pytest.approx(0.5)
    # ...and a late record from the day before does not leak into the new day.
    await store.insert_many([rec("r4", cost_usd=4.0, created_at=DAY1)])
    assert await spend(db, now=DAY2) == pytest.approx(0.5)
    # One batch spanning the boundary leaves only the newest period's spend.
    day3 = DAY2 + timedelta(days=1)
    await store.insert_many(
        [rec("r5", cost_usd=1.0, created_at=day3), rec("r6", cost_usd=7.0, created_at=DAY2)]
    )
    stored = await keys.get("key_a", now=day3)
    assert stored is not None
    assert stored.spend_usd == pytest.approx(1.0)
    assert stored.period_started_at == datetime(2025, 3, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "before", "after"),
    [
        ("weekly", datetime(2025, 3, 9, 23, tzinfo=UTC), datetime(2025, 3, 10, 1, tzinfo=UTC)),
        ("monthly", datetime(2025, 3, 31, 23, tzinfo=UTC), datetime(2025, 4, 1, 1, tzinfo=UTC)),
    ],
)
async def test_weekly_and_monthly_periods(
    db: Database, period: str, before: datetime, after: datetime
) -> None:
    await add_key(db, budget_usd=10.0, budget_period=period, created_at=before)
    store = UsageStore(db)
    await store.insert_many([rec("r1", cost_usd=2.0, created_at=before)])
    await store.insert_many([rec("r2", cost_usd=1.0, created_at=before + timedelta(minutes=1))])
    assert await spend(db, now=before) == pytest.approx(3.0)
    await store.insert_many([rec("r3", cost_usd=0.5, created_at=after)])
    assert await spend(db, now=after) == pytest.approx(0.5)


async def test_lifetime_budget_never_resets(db: Database) -> None:
    await add_key(db, budget_usd=10.0, created_at=DAY1)
    store = UsageStore(db)
    await store.insert_many([rec("r1", cost_usd=2.0)])
    await store.insert_many([rec("r2", cost_usd=2.0, created_at=DAY1 + timedelta(days=400))])
    assert await spend(db, now=DAY1 + timedelta(days=401)) == pytest.approx(4.0)


async def test_query_groups_and_filters(db: Database) -> None:
    store = UsageStore(db)
    late = datetime(2025, 3, 5, 23, 59, 59, 999_000, tzinfo=UTC)
    await store.insert_many(
        [
            rec("a1", key_id="key_a", model="m1", created_at=DAY1, cache_hit=True),
            rec("a2", key_id="key_a", model="m1", created_at=late, cost_usd=0.5),
            rec("a3", key_id="key_a", model="m2", created_at=DAY2, prompt_tokens=100),
            rec("b1", key_id="key_b", model="m1", created_at=DAY2, completion_tokens=7),
            rec("n1", key_id=None, model="m1", created_at=DAY2),
        ]
    )

    rows = await store.query()
    assert rows == [
        {"key_id": "key_a", "model": "m1", "day": "2025-03-05", "requests": 2,
         "prompt_tokens": 20, "completion_tokens": 10, "cost_usd": 1.5, "cache_hits": 1},
        {"key_id": "key_a", "model": "m2", "day": "2025-03-06", "requests": 1,
         "prompt_tokens": 100, "completion_tokens": 5, "cost_usd": 1.0, "cache_hits": 0},
        {"key_id": "key_b", "model": "m1", "day": "2025-03-06", "requests": 1,
         "prompt_tokens": 10, "completion_tokens": 7, "cost_usd": 1.0, "cache_hits": 0},
        {"key_id": None, "model": "m1", "day": "2025-03-06", "requests": 1,
         "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 1.0, "cache_hits": 0},
    ]  # fmt: skip

    by_day = await store.query(group_by=["day"])
    assert [(r["day"], r["requests"]) for r in by_day] == [("2025-03-05", 2), ("2025-03-06", 3)]
    assert set(by_day[0]) == {
        "day", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "cache_hits"
    }  # fmt: skip

    by_model = await store.query(key_id="key_a", group_by=["model"])
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in by_model] == [
        ("m1", 2, 1.5),
        ("m2", 1, 1.0),
    ]
    assert await store.query(model="m2", group_by=["key"]) == [
        {"key_id": "key_a", "requests": 1, "prompt_tokens": 100, "completion_tokens": 5,
         "cost_usd": 1.0, "cache_hits": 0},
    ]  # fmt: skip

    window = await store.query(since=late, until=DAY2, group_by=[])
    assert window == [
        {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.5,
         "cache_hits": 0}
    ]  # fmt: skip
    assert await store.query(since=DAY2 + timedelta(seconds=1), group_by=[]) == []
    assert await store.query(key_id="key_missing") == []


async def test_concurrent_batches_charge_exactly(db: Database) -> None:
    await add_key(db, budget_usd=100.0, budget_period="monthly", created_at=DAY1)
    store = UsageStore(db)
    # Ten writers at once; each batch overlaps the next one by five request ids.
    batches = [[rec(f"r{i}", cost_usd=0.5) for i in range(n * 10, n * 10 + 15)] for n in range(10)]
    inserted = await asyncio.gather(*(store.insert_many(b) for b in batches))
    assert sum(inserted) == 105
    assert await store.count() == 105
    assert await spend(db) == pytest.approx(52.5)


async def stored_rows(db: Database) -> dict[str, UsageRecord]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(usage_records))).mappings().all()
    return {
        r["request_id"]: UsageRecord(
            **{name: value for name, value in r.items() if name != "created_at"},
            created_us=micros(r["created_at"]),
        )
        for r in rows
    }


async def test_every_column_round_trips(db: Database) -> None:
    # Distinct values in every column, so that columns swapped by the hand-written INSERT
    # would show; created_at: microseconds, none, another time zone, the far past.
    plus2 = timezone(timedelta(hours=2))
    records = [
        UsageRecord(
            request_id="r1", model="m1", key_id="key_a", deployment="d1", prompt_tokens=11,
            completion_tokens=7, cost_usd=0.000123456789, latency_ms=12.5, status=200,
            cache_hit=True, stream=False,
            created_us=micros(datetime(2025, 3, 5, 10, 0, 0, 123456, UTC)),
        ),
        UsageRecord(
            request_id="r2", model="m2", key_id=None, deployment=None, prompt_tokens=0,
            completion_tokens=2**31 - 1, cost_usd=0.0, latency_ms=0.25, status=429,
            cache_hit=False, stream=True,
            created_us=micros(datetime(2025, 3, 5, 12, 30, tzinfo=plus2)),
        ),
        rec("r3", created_at=datetime(1999, 12, 31, 23, 59, 59, 999999, UTC), cost_usd=1e-12),
        rec("r4", model="ünïcode ✓", created_at=datetime(2025, 1, 1, tzinfo=UTC)),
    ]  # fmt: skip
    assert await UsageStore(db).insert_many(records) == 4
    stored = await stored_rows(db)
    assert stored == {r.request_id: r for r in records}
    assert stored["r2"].created_at == datetime(2025, 3, 5, 10, 30, tzinfo=UTC)


async def test_sqlite_stores_timestamps_as_sqlalchemy_does(db: Database) -> None:
    if db.dialect != "sqlite":
        pytest.skip("SQLite's text storage only")
    await UsageStore(db).insert_many(
        [rec("r1", created_at=datetime(2025, 3, 5, 10, 0, tzinfo=UTC)),
         rec("r2", created_at=datetime(2025, 3, 5, 10, 0, 1, 5, UTC)),
         rec("r3", created_at=datetime(2025, 3, 5, 10, 0, 1, 45_678, UTC)),
         rec("r4", created_at=datetime(2025, 3, 5, 23, 59, 59, 999_999, UTC))]
    )  # fmt: skip
    async with db.engine.connect() as conn:
        raw = (await conn.exec_driver_sql("SELECT created_at FROM usage_records")).scalars()
        assert sorted(raw) == [
            "2025-03-05 10:00:00.000000",
            "2025-03-05 10:00:01.000005",
            "2025-03-05 10:00:01.045678",
            "2025-03-05 23:59:59.999999",
        ]
        # ...which is what SQLAlchemy (and so the rest of the store) writes and compares with.
        since = select(func.count()).where(usage_records.c.created_at >= DAY1)
        assert await conn.scalar(since) == 4


async def test_large_batch_partly_replayed(db: Database) -> None:
    await add_key(db, "key_a")
    await add_key(db, "key_d", budget_usd=1e6, budget_period="daily", created_at=DAY1)
    store = UsageStore(db)
    first = [
        rec(f"r{i:05d}", key_id="key_a" if i % 2 else "key_d", cost_usd=0.5) for i in range(1500)
    ]
    assert await store.insert_many(first) == 1500
    second = [
        rec(f"r{i:05d}", key_id="key_a" if i % 2 else "key_d", cost_usd=0.5)
        for i in range(1000, 3000)
    ]
    assert await store.insert_many(second) == 1500
    assert await store.count() == 3000
    assert await spend(db, "key_a") == pytest.approx(750.0)
    assert await spend(db, "key_d") == pytest.approx(750.0)


async def test_lifetime_and_periodic_keys_in_one_batch(db: Database) -> None:
    await add_key(db, "key_life", budget_usd=100.0, created_at=DAY1)
    await add_key(db, "key_day", budget_usd=100.0, budget_period="daily", created_at=DAY1)
    store = UsageStore(db)
    await store.insert_many(
        [
            rec("r1", key_id="key_life", cost_usd=1.0, created_at=DAY1),
            rec("r2", key_id="key_day", cost_usd=2.0, created_at=DAY1),
            rec("r3", key_id="key_life", cost_usd=4.0, created_at=DAY2),
            rec("r4", key_id="key_day", cost_usd=8.0, created_at=DAY2),
            rec("r5", key_id="key_day", cost_usd=16.0, created_at=DAY1),
        ]
    )
    assert await spend(db, "key_life", now=DAY2) == pytest.approx(5.0)
    assert await spend(db, "key_day", now=DAY2) == pytest.approx(8.0)
    life = await KeyStore(db).get("key_life", now=DAY2)
    assert life is not None
    assert life.period_started_at is None
