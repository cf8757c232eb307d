"""Usage records: idempotent batched inserts, per-key spend, and aggregate queries."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Literal, NamedTuple

import orjson
from sqlalchemy import ColumnElement, Float, bindparam, case, func, or_, select, update
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from sluice.store.database import Database
from sluice.store.periods import as_utc, current_period_start
from sluice.store.schema import api_keys, usage_records
from sluice.store.sqlite_thread import SqliteConnection, SqliteThread
from sluice.store.types import UTCDateTime, storable_text

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MICROS_PER_DAY = 86_400_000_000
_REQUEST_ID = itemgetter(0)  # a UsageRecord's request_id, called from C (map, sorted)

GroupBy = Literal["key", "model", "day"]
_GROUP_NAMES: dict[str, str] = {"key": "key_id", "model": "model", "day": "day"}


def micros(value: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch (UTC), exactly."""
    return (as_utc(value) - _EPOCH) // _MICROSECOND


def from_micros(us: int) -> datetime:
    """The inverse of `micros`: an aware datetime in UTC."""
    return _EPOCH + timedelta(microseconds=us)


def now_micros() -> int:
    return time.time_ns() // 1000


class UsageRecord(NamedTuple):
    """One request's usage; ``request_id`` makes writing it idempotent.

    Made once per request, so kept cheap: a named tuple, which
    `sluice.pipeline.accounting` makes with ``tuple.__new__`` (no Python-level constructor
    call, which a dataclass, slots or frozen, would cost), so the field order is part of
    the interface. The time is ``created_us``, integer microseconds since the Unix epoch
    (UTC; `micros` converts a datetime, `now_micros` reads the clock): written to either
    database without a datetime in between, as making the datetime and its text for
    SQLite cost more than the rest of the record. ``created_at`` is the same instant as a
    datetime. (Figures: docs/architecture.md.)
    """

    request_id: str
    model: str
    created_us: int
    key_id: str | None = None
    deployment: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    status: int = 200
    cache_hit: bool = False
    stream: bool = False
    client_request_id: str | None = None
    """The client's ``X-Request-ID``, for correlation only: ``request_id`` is the server's."""
    batch_id: str | None = None
    """The batch the request was a line of (`sluice.batches`); None for interactive ones."""

    @property
    def created_at(self) -> datetime:
        return from_micros(self.created_us)

    def to_json(self) -> dict[str, Any]:
        """The spool's JSON line: ``created_at`` as ISO 8601 text (readable, and the format
        spools were written in before ``created_us``)."""
        values = self._asdict()
        del values["created_us"]
        values["created_at"] = self.created_at.isoformat()
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> UsageRecord:
        values = dict(values)
        values["created_us"] = micros(datetime.fromisoformat(values.pop("created_at")))
        return cls(**values)


# The spend update, one row per (key, period start of the records' created_at), or per key
# with no period start (NULL) for lifetime budgets, which only add. For periodic keys a
# newer period resets the spend, the same period adds to it, and an older period (a late
# or replayed record) leaves the current period's spend alone. (A lifetime row leaves
# period_started_at as it is: comparing with NULL is never true.)
_P = bindparam("b_period_start", type_=UTCDateTime())
_COST = bindparam("b_cost", type_=Float())
_started = api_keys.c.period_started_at
_rolls = or_(_started.is_(None), _started < _P)
_SPEND = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("b_key"))
    .values(
        spend_usd=case(
            (_P.is_(None), api_keys.c.spend_usd + _COST),
            (_rolls, _COST),
            (_started == _P, api_keys.c.spend_usd + _COST),
            else_=api_keys.c.spend_usd,
        ),
        period_started_at=case((_rolls, _P), else_=_started),
    )
)
# The statements as the writers send them straight to their drivers (`_write_postgres`,
# `_write_sqlite`; SQLAlchemy only lends the connection): the spend update compiled from
# _SPEND for each, and the stored keys' budget periods, read with the batch's key ids as
# one array (PostgreSQL, holding the key rows until commit) or one JSON array (SQLite,
# json_each as in _SQLITE_EXISTING; writers hold the database lock from BEGIN IMMEDIATE).
_SQLITE_SPEND = str(_SPEND.compile(dialect=sqlite_dialect(paramstyle="named")))
_PG_SPEND_COMPILED = _SPEND.compile(dialect=asyncpg_dialect())  # type: ignore[no-untyped-call]
assert _PG_SPEND_COMPILED.positiontup == ["b_period_start", "b_cost", "b_key"]  # $1, $2, $3
_PG_SPEND = str(_PG_SPEND_COMPILED)
_PG_KEY_PERIODS = (
    "SELECT id, budget_period FROM api_keys WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
)
_SQLITE_KEY_PERIODS = (
    "SELECT id, budget_period FROM api_keys WHERE id IN (SELECT value FROM json_each(?))"
)


# The insert fast path. insert_many runs in the gateway's process, on its CPU budget (one
# asyncio thread; aiosqlite's thread shares the GIL). Through SQLAlchemy Core (asdict(),
# a compiled INSERT ... RETURNING, a type processor per value) a record cost a sizeable
# share of a request's CPU; rows built as plain tuples and handed to the driver as one
# JSON document (PostgreSQL) or to one prepared statement (SQLite) cost a fraction of that,
# on SQLite mostly SQLite's own B-tree and WAL work (figures: docs/architecture.md). The
# spend update stays in SQLAlchemy Core: two statements per batch, whatever its size. The
# SQL below must match schema.usage_records.
# Both drivers write at most this many records per statement, the event loop running
# requests between statements (a backlog batch laid out and sent at once held the loop
# long enough to show in request latency).
_ROWS_PER_STATEMENT = 1024
# Both statements list the columns in UsageRecord's field order (its created_us is the
# created_at column), so a record is its row but for the time's format (and, on SQLite,
# the booleans).
_COLUMNS = ", ".join("created_at" if f == "created_us" else f for f in UsageRecord._fields)
# PostgreSQL: one statement per _ROWS_PER_STATEMENT records, as JSON arrays (orjson, with
# tuple() for the named tuple it does not encode itself): cheaper a record than asyncpg's
# array parameters (INSERT ... SELECT FROM unnest($1::text[], ...)) a value. created_at
# travels as integer
# microseconds since the epoch (exact: the product is exact below 2**53 us, the year 2255).
# Rows go in in request_id order, so two concurrent batches sharing ids wait on each other
# in the same order rather than deadlock. The statement returns the ids it skipped
# (already stored): usually none.
_PG_INSERT = f"""\
WITH batch ({_COLUMNS}) AS (
    SELECT r->>0, r->>1, TIMESTAMPTZ 'epoch' + (r->>2)::int8 * INTERVAL '1 microsecond',
        r->>3, r->>4, (r->>5)::int4, (r->>6)::int4, (r->>7)::float8, (r->>8)::float8,
        (r->>9)::int4, (r->>10)::bool, (r->>11)::bool, r->>12, r->>13
    FROM json_array_elements($1::json) AS r
), inserted AS (
    INSERT INTO usage_records ({_COLUMNS})
    SELECT * FROM batch ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
)
SELECT request_id FROM batch EXCEPT ALL SELECT request_id FROM inserted"""
# SQLite: the batch goes in as multi-row INSERT ... VALUES statements of up to 1,024 rows
# (14,336 parameters; SQLite allows 32,766), each one sqlite3_step. Python's sqlite3
# releases the GIL around every step: executemany's step per row made the writer thread and
# the event loop trade the GIL (two context switches) for every record, and cost more CPU
# a record than this. The insert is optimistic: a batch rarely holds ids that are stored
# already (only a replay does), so the ids are not looked up first (a look-up costs about
# as much as the insert). A statement that meets a stored id fails as a whole (SQLite backs
# out that statement only; the transaction goes on), and then the rest of the batch is
# looked up once, as one JSON array of ids (json_each, built into SQLite 3.38+), and only
# the ids not found are inserted. Writers hold the database lock from BEGIN IMMEDIATE (see
# Database), so the ids stored cannot change in between; should that ever not hold, the
# INSERT fails again and the recorder retries the batch, rather than charging twice.
_SQLITE_EXISTING = (
    "SELECT request_id FROM usage_records WHERE request_id IN (SELECT value FROM json_each(?))"
)
_SQLITE_ROW = "(" + ", ".join("?" * len(UsageRecord._fields)) + ")"


def _sqlite_chunk(left: int) -> int:
    """Rows for the next INSERT: a power of two, so the few distinct statements stay in
    sqlite3's statement cache (compiling a 1,000-row statement costs more than running it)."""
    return min(_ROWS_PER_STATEMENT, 1 << (left.bit_length() - 1))


@functools.cache
def _sqlite_insert(rows: int) -> str:
    return f"INSERT INTO usage_records ({_COLUMNS}) VALUES " + ", ".join([_SQLITE_ROW] * rows)


_DIGITS3 = tuple(f"{n:03d}" for n in range(1000))
"""'000' to '999': a microsecond's six digits as two look-ups (formatting them with
``:06d`` was a large part of a row's cost)."""


def _sqlite_params(records: Sequence[UsageRecord], seconds: dict[int, str]) -> list[object]:
    """The records' column values, one after another, as Python's sqlite3 binds them fast.

    ``created_at`` is UTCDateTime's text on SQLite: SQLAlchemy's fixed-width
    'YYYY-MM-DD HH:MM:SS.ffffff', no offset; ``seconds`` caches it up to the second's '.'
    (a batch spans a few seconds), `_DIGITS3` gives the microseconds. The booleans go as
    0/1: sqlite3 binds only exact int/float/str/bytes/None directly and sends anything else
    (bool included) through its adapter look-up, which raises and swallows AttributeErrors.
    One loop with no call per record (unpacked in the record's field order: a helper call
    per record was a third of a record's cost here)."""
    params: list[object] = []
    extend = params.extend
    for (
        request_id, model, us, key_id, deployment, prompt_tokens, completion_tokens, cost_usd,
        latency_ms, status, cache_hit, stream, client_request_id, batch_id,
    ) in records:  # fmt: skip
        second = us // 1_000_000
        prefix = seconds.get(second)
        if prefix is None:
            prefix = seconds[second] = time.strftime("%Y-%m-%d %H:%M:%S.", time.gmtime(second))
        extend(
            (
                request_id, model, f"{prefix}{_DIGITS3[us // 1000 % 1000]}{_DIGITS3[us % 1000]}",
                key_id, deployment,
                prompt_tokens, completion_tokens, cost_usd, latency_ms, status,
                1 if cache_hit else 0, 1 if stream else 0, client_request_id, batch_id,
            )
        )  # fmt: skip
    return params


async def _write_postgres(conn: AsyncConnection, unique: list[UsageRecord]) -> int:
    """Insert ``unique``'s records (distinct request ids) that are not stored yet and charge
    their cost, in one transaction on the asyncpg connection itself; returns how many were
    new.

    SQLAlchemy only lends the connection (nothing is executed through it, so it begins no
    transaction of its own): through its adapter the batch's BEGIN, key periods, spend
    update and COMMIT cost the gateway's CPU more than a third of a batch's fixed cost,
    most of what is left being the pool's pre-ping."""
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None  # an asyncpg.Connection
    # Chunks go in in request_id order, like the rows within each, keeping concurrent
    # batches deadlock-free.
    ordered = sorted(unique, key=_REQUEST_ID)
    async with driver.transaction():
        skipped: set[str] = set()
        for i in range(0, len(ordered), _ROWS_PER_STATEMENT):
            rows = ordered[i : i + _ROWS_PER_STATEMENT]
            # Costs and latencies are finite (prices refuse inf/NaN); orjson writes NaN as null.
            encoded = orjson.dumps(rows, default=tuple).decode()
            skipped.update(request_id for (request_id,) in await driver.fetch(_PG_INSERT, encoded))
        new = [r for r in ordered if r.request_id not in skipped] if skipped else ordered
        costs = _costs_by_day(new)
        if costs:
            found = await driver.fetch(_PG_KEY_PERIODS, _key_ids(costs))
            periods = {key_id: period for key_id, period in found}
            spends = _spends(costs, periods)
            if spends:
                await driver.executemany(
                    _PG_SPEND, [(start, cost, key_id) for key_id, start, cost in spends]
                )
    return len(new)


async def _write_sqlite(
    conn: AsyncConnection, unique: list[UsageRecord], thread: SqliteThread
) -> int:
    """Insert ``unique``'s records (distinct request ids) that are not stored yet and charge
    their cost, in one transaction (BEGIN IMMEDIATE, as Database's writer), on aiosqlite's
    thread in one hop; returns how many were new.

    Through SQLAlchemy's aiosqlite adapter every statement is three or four hops to the
    driver's thread and back (cursor, execute, fetch, close), each a thread wake-up and an
    event-loop turn, which cost far more than the rows themselves. Here the transaction,
    the inserts, the look-up of stored ids, the key periods and the spend update run as one
    function on that thread (SQLAlchemy only lends the connection; nothing is executed
    through it, so it begins no transaction of its own, and its rollback on return is a
    no-op), by `SqliteThread`: aiosqlite has no public call for it.
    """
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None  # an aiosqlite.Connection
    return await thread.run(driver, _write_sqlite_now, unique)


def _write_sqlite_now(sqlite: SqliteConnection, records: list[UsageRecord]) -> int:
    """`_write_sqlite`'s work, on the driver's thread (its sqlite3 connection may be used on
    that thread only)."""
    sqlite.execute("BEGIN IMMEDIATE")
    try:
        inserted = _insert_and_charge_sqlite(sqlite, records)
        sqlite.execute("COMMIT")
    except BaseException:
        if sqlite.in_transaction:  # a failed COMMIT (say, busy) leaves it open too
            sqlite.execute("ROLLBACK")
        raise
    return inserted


def _insert_and_charge_sqlite(sqlite: SqliteConnection, records: list[UsageRecord]) -> int:
    seconds: dict[int, str] = {}
    looked_up = False
    i = 0
    while i < len(records):
        size = _sqlite_chunk(len(records) - i)
        try:
            sqlite.execute(_sqlite_insert(size), _sqlite_params(records[i : i + size], seconds))
        except sqlite3.IntegrityError:
            if looked_up:
                raise
            looked_up = True
            rest = records[i:]
            found = sqlite.execute(
                _SQLITE_EXISTING, (orjson.dumps([r.request_id for r in rest]).decode(),)
            ).fetchall()
            stored = {request_id for (request_id,) in found}
            records[i:] = [r for r in rest if r.request_id not in stored]
            continue
        i += size
    costs = _costs_by_day(records)
    if not costs:
        return len(records)
    key_ids = orjson.dumps(_key_ids(costs)).decode()
    spends = _spends(costs, dict(sqlite.execute(_SQLITE_KEY_PERIODS, (key_ids,)).fetchall()))
    if spends:
        sqlite.executemany(
            _SQLITE_SPEND,
            [
                {
                    "b_key": key_id,
                    "b_period_start": None if start is None else _sqlite_time(start),
                    "b_cost": cost,
                }
                for key_id, start, cost in spends
            ],
        )
    return len(records)


def _sqlite_time(value: datetime) -> str:
    """UTCDateTime's text on SQLite (SQLAlchemy's DATETIME storage format, in UTC)."""
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")


class UsageStore:
    def __init__(self, db: Database, *, sqlite_thread: SqliteThread | None = None) -> None:
        self._db = db
        # How SQLite batches reach aiosqlite's thread, chosen once at start-up by the
        # installed aiosqlite (only a SQLite store needs it).
        self._sqlite_thread = sqlite_thread
        if sqlite_thread is None and db.dialect == "sqlite":
            self._sqlite_thread = SqliteThread()

    async def insert_many(self, records: Sequence[UsageRecord]) -> int:
        """Insert records not already stored and charge their cost to their keys, in one
        transaction; returns how many were new. Replaying a batch changes nothing."""
        # A batch rarely holds one request id twice (a replay may): counted in C first
        # (a fraction of the dict below's cost a record).
        unique = list(records)
        if len(set(map(_REQUEST_ID, unique))) != len(unique):
            first: dict[str, UsageRecord] = {}
            for record in unique:
                first.setdefault(record.request_id, record)  # the first of duplicates wins
            unique = list(first.values())
        if not unique:
            return 0
        async with self._db.engine.connect() as conn:  # the transaction is the writer's
            if self._db.engine.dialect.name == "postgresql":
                return await _write_postgres(conn, unique)
            assert self._sqlite_thread is not None
            return await _write_sqlite(conn, unique, self._sqlite_thread)

    async def query(
        self,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[GroupBy] = ("key", "model", "day"),
    ) -> list[dict[str, Any]]:
        """Totals per group, over ``since <= created_at < until``.

        Each row has ``requests``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``,
        ``cache_hits`` (requests answered from the cache, at no cost) and the grouped
        columns: ``key_id``, ``model``, ``day`` ('YYYY-MM-DD', UTC).
        """
        if not all(storable_text(v) for v in (key_id, model) if v is not None):
            return []  # no record has such a key or model
        t = usage_records
        columns: dict[str, ColumnElement[Any]] = {"key_id": t.c.key_id, "model": t.c.model}
        columns["day"] = self._day(t.c.created_at)
        groups = [columns[_GROUP_NAMES[g]].label(_GROUP_NAMES[g]) for g in dict.fromkeys(group_by)]
        stmt = select(
            *groups,
            func.count().label("requests"),
            func.coalesce(func.sum(t.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(t.c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(t.c.cost_usd), 0.0).label("cost_usd"),
            func.coalesce(func.sum(case((t.c.cache_hit, 1), else_=0)), 0).label("cache_hits"),
        )
        if key_id is not None:
            stmt = stmt.where(t.c.key_id == key_id)
        if model is not None:
            stmt = stmt.where(t.c.model == model)
        if since is not None:
            stmt = stmt.where(t.c.created_at >= as_utc(since))
        if until is not None:
            stmt = stmt.where(t.c.created_at < as_utc(until))
        if groups:
            stmt = stmt.group_by(*groups).order_by(*(g.asc().nulls_last() for g in groups))
        async with self._db.engine.connect() as conn:
            result = (await conn.execute(stmt)).mappings().all()
        return [_row(r) for r in result if groups or r["requests"]]

    async def count(self) -> int:
        async with self._db.engine.connect() as conn:
            return int((await conn.scalar(select(func.count()).select_from(usage_records))) or 0)

    def _day(self, column: ColumnElement[Any]) -> ColumnElement[str]:
        if self._db.engine.dialect.name == "postgresql":
            return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
        return func.strftime("%Y-%m-%d", column)  # stored as UTC text


def _row(row: Any) -> dict[str, Any]:
    values = dict(row)
    for name in ("requests", "prompt_tokens", "completion_tokens", "cache_hits"):
        values[name] = int(values[name])
    values["cost_usd"] = float(values["cost_usd"])
    return values


def _costs_by_day(records: Iterable[UsageRecord]) -> dict[tuple[str, int], float]:
    """The cost to charge, summed per key and UTC day (days since the epoch): one cheap
    pass over the records (no call a record), so the period arithmetic of `_spends` runs
    once per (key, day) rather than once per record."""
    by_day: defaultdict[tuple[str, int], float] = defaultdict(float)
    for record in records:
        cost = record.cost_usd
        if cost and record.key_id:
            by_day[record.key_id, record.created_us // _MICROS_PER_DAY] += cost
    return by_day


def _key_ids(costs: dict[tuple[str, int], float]) -> list[str]:
    """The keys charged, sorted: both writers lock or look up key rows in id order."""
    return sorted({key_id for key_id, _ in costs})


def _spends(
    costs: dict[tuple[str, int], float], periods: dict[str, str | None]
) -> list[tuple[str, datetime | None, float]]:
    """The spend updates for ``costs`` (`_costs_by_day`): (key id, period start or None for
    a lifetime budget, cost), lifetime ones first, then oldest period first (so a key's
    newest period is the one left standing). ``periods`` holds each stored key's budget
    period; costs of other keys (from the config file, or deleted) have no stored spend."""
    lifetime: defaultdict[str, float] = defaultdict(float)
    periodic: defaultdict[tuple[datetime, str], float] = defaultdict(float)
    for (key_id, day), cost in costs.items():
        if key_id not in periods:
            continue
        period = periods[key_id]
        if period is None:
            lifetime[key_id] += cost
        else:
            midnight = _EPOCH + timedelta(days=day)
            periodic[(current_period_start(period, midnight), key_id)] += cost
    spends: list[tuple[str, datetime | None, float]] = [
        (k, None, c) for k, c in sorted(lifetime.items())
    ]
    spends += [(k, start, c) for (start, k), c in sorted(periodic.items())]
    return spends
