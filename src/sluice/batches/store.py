"""Batches and their lines in the database: created whole, claimed line by line with a
lease, each line's answer written once, finalised once.

The queue is the ``batch_lines`` table itself. A worker claims lines with one ``UPDATE``
that marks them running under its name until ``lease_until``; on PostgreSQL the rows it
picks are locked ``FOR UPDATE SKIP LOCKED``, so replicas claiming at once take disjoint
lines without waiting on each other; on SQLite writers are serialised by the database lock
(``BEGIN IMMEDIATE``, `sluice.store.database`), which gives the same. A line whose lease
ran out (its worker died) is queued again (`requeue_lapsed`). A line's answer is written
only by the worker holding its lease (`finish_line`), so a line that two workers ran (the
first too slow for its lease) has one answer. Nothing here is a lock of our own: the
database's row locks and conditional updates do the coordinating.

A batch is finalised by whichever worker first moves it from ``in_progress`` (or
``cancelling``) to ``finalizing`` once none of its lines is queued or running: one
conditional update, one winner.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, select, text, update

from sluice.batches.owners import ANYONE, Owner, owned_by
from sluice.batches.validate import Line, LineError
from sluice.store.database import Database
from sluice.store.periods import utcnow
from sluice.store.schema import batch_lines, batches
from sluice.store.types import UTCDateTime, storable_text

OPEN_STATES = ("queued", "running")
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
_INSERT_CHUNK = 500
FINALIZE_RETRY = timedelta(minutes=5)
_CLAIM_BATCHES = 8  # batches a claim spreads over
_GAVE_UP = (
    '{"error":{"message":"The line was claimed too many times without an answer (its '
    'worker died each time).","type":"server_error","param":null,"code":"batch_line_abandoned"}}'
)
"""A batch left in ``finalizing`` this long (its finaliser died) is finalised again."""


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    queued: int = 0
    running: int = 0


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    key_id: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: datetime
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    in_progress_at: datetime | None = None
    expires_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    request_total: int = 0
    counts: Counts = field(default_factory=Counts)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's batch object."""

        def seconds(moment: datetime | None) -> int | None:
            return int(moment.timestamp()) if moment is not None else None

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": seconds(self.created_at),
            "in_progress_at": seconds(self.in_progress_at),
            "expires_at": seconds(self.expires_at),
            "finalizing_at": seconds(self.finalizing_at),
            "completed_at": seconds(self.completed_at),
            "failed_at": seconds(self.failed_at),
            "expired_at": seconds(self.expired_at),
            "cancelling_at": seconds(self.cancelling_at),
            "cancelled_at": seconds(self.cancelled_at),
            "request_counts": {
                "total": self.counts.total or self.request_total,
                "completed": self.counts.completed,
                "failed": self.counts.failed,
            },
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Claim:
    """A line a worker holds the lease of."""

    batch_id: str
    line: int
    custom_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished line, as the output and error files list it."""

    line: int
    custom_id: str
    state: str
    status_code: int | None
    result: str | None
    request_id: str | None


async def _with_counts(conn: Any, rows: Sequence[Any]) -> builtins.list[BatchRecord]:
    """The batches of ``rows``, each with its line counts (one query for all of them)."""
    if not rows:
        return []
    states = await conn.execute(
        select(batch_lines.c.batch_id, batch_lines.c.state, func.count())
        .where(batch_lines.c.batch_id.in_([row.id for row in rows]))
        .group_by(batch_lines.c.batch_id, batch_lines.c.state)
    )
    by_batch: dict[str, dict[str, int]] = {}
    for batch_id, state, count in states:
        by_batch.setdefault(batch_id, {})[state] = int(count)
    return [
        BatchRecord(
            **dict(row._mapping), counts=_counts(by_batch.get(row.id, {}), row.request_total)
        )
        for row in rows
    ]


class BatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        *,
        key_id: str | None,
        endpoint: str,
        input_file_id: str,
        completion_window: timedelta,
        window_name: str,
        metadata: dict[str, str] | None,
        lines: Sequence[Line],
        errors: Sequence[LineError],
    ) -> BatchRecord:
        """A new batch: ``failed`` at once with ``errors`` when its input was refused, else
        ``in_progress`` with its lines queued (validation ran before: there is nothing to
        wait for in ``validating``)."""
        now = utcnow()
        values: dict[str, Any] = {
            "id": new_batch_id(),
            "key_id": key_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": window_name,
            "metadata": metadata,
            "created_at": now,
            "request_total": len(lines),
        }
        if errors:
            values |= {
                "status": "failed",
                "failed_at": now,
                "errors": [e.to_openai() for e in errors],
            }
        else:
            values |= {
                "status": "in_progress",
                "in_progress_at": now,
                "expires_at": now + completion_window,
            }
        async with self._db.writer.begin() as conn:
            await conn.execute(insert(batches).values(values))
            for start in range(0, len(lines), _INSERT_CHUNK):
                chunk = lines[start : start + _INSERT_CHUNK]
                await conn.execute(
                    insert(batch_lines),
                    [
                        {
                            "batch_id": values["id"],
                            "line": line.number,
                            "custom_id": line.custom_id,
                            "body": line.body.decode(),
                            "state": "queued",
                        }
                        for line in chunk
                    ],
                )
        found = await self.get(values["id"], ANYONE)
        assert found is not None
        return found

    async def get(self, batch_id: str, owner: Owner) -> BatchRecord | None:
        """The batch with its line counts; None when missing or owned by another than
        ``owner`` (`sluice.batches.owners`)."""
        if not storable_text(batch_id):
            return None
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()
            if row is None or (owner is not ANYONE and row.key_id != owner):
                return None
            (found,) = await _with_counts(conn, [row])
        return found

    async def list(
        self, owner: str | None, *, limit: int, after: str | None
    ) -> tuple[builtins.list[BatchRecord], bool]:
        """The owner's batches, newest first, after the batch ``after``; and whether there
        are more."""
        query = select(batches).where(_owned_by(owner))
        if after is not None:
            # A cursor that is not one of the owner's batches gives an empty page (starting
            # over could loop a client whose anchor is gone).
            if not storable_text(after):
                return [], False
            anchor = select(batches.c.created_at, batches.c.id).where(
                batches.c.id == after, _owned_by(owner)
            )
            async with self._db.engine.connect() as conn:
                point = (await conn.execute(anchor)).first()
            if point is None:
                return [], False
            query = query.where(
                (batches.c.created_at < point.created_at)
                | and_(batches.c.created_at == point.created_at, batches.c.id < point.id)
            )
        query = query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            return await _with_counts(conn, rows[:limit]), len(rows) > limit

    async def recent(
        self, *, limit: int, status: str | None = None, key_id: str | None = None
    ) -> builtins.list[BatchRecord]:
        """The newest batches of every owner (for operators: `sluice batches list`)."""
        query = select(batches)
        if status is not None:
            query = query.where(batches.c.status == status)
        if key_id is not None:
            query = query.where(batches.c.key_id == key_id)
        query = query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
        async with self._db.engine.connect() as conn:
            return await _with_counts(conn, (await conn.execute(query)).all())

    async def cancel(self, batch_id: str) -> bool:
        """``in_progress`` → ``cancelling``: no line starts from now on (those running
        finish); False when the batch is in no state to cancel."""
        now = utcnow()
        async with self._db.writer.begin() as conn:
            moved = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == "in_progress")
                .values(status="cancelling", cancelling_at=now)
            )
            if moved.rowcount == 1:
                await _close_queued(conn, batch_id, "cancelled")
        return bool(moved.rowcount == 1)

    # The workers' side.

    async def requeue_lapsed(self, now: datetime, max_attempts: int) -> int:
        """Queue again the running lines whose lease ran out (their worker died or
        stalled); a line that has been claimed ``max_attempts`` times fails instead (it
        may be what kills its workers). Returns how many leases had run out."""
        lapsed = (batch_lines.c.state == "running") & (batch_lines.c.lease_until < now)
        async with self._db.writer.begin() as conn:
            failed = await conn.execute(
                update(batch_lines)
                .where(lapsed, batch_lines.c.attempts >= max_attempts)
                .values(
                    state="failed",
                    status_code=500,
                    result=_GAVE_UP,
                    lease_owner=None,
                    lease_until=None,
                )
            )
            queued = await conn.execute(
                update(batch_lines)
                .where(lapsed)
                .values(state="queued", lease_owner=None, lease_until=None)
            )
        return int(failed.rowcount or 0) + int(queued.rowcount or 0)

    async def close_unclaimable(self) -> None:
        """Close the queued lines of batches no worker will claim from again (cancelling,
        or past their window): a line given back or re-queued after the cancel or the
        expiry would otherwise keep its batch from ever finishing."""
        async with self._db.writer.begin() as conn:
            for state, condition in (
                ("cancelled", batches.c.status == "cancelling"),
                ("expired", batches.c.expired_at.is_not(None)),
            ):
                closing = select(batches.c.id).where(condition)
                await conn.execute(
                    update(batch_lines)
                    .where(batch_lines.c.state == "queued", batch_lines.c.batch_id.in_(closing))
                    .values(state=state)
                )

    async def expire_due(self, now: datetime) -> builtins.list[str]:
        """Batches past their completion window: their queued lines will not run."""
        async with self._db.writer.begin() as conn:
            due = (
                await conn.execute(
                    update(batches)
                    .where(
                        batches.c.status == "in_progress",
                        batches.c.expires_at < now,
                        batches.c.expired_at.is_(None),
                    )
                    .values(expired_at=now)
                    .returning(batches.c.id)
                )
            ).all()
            for (batch_id,) in due:
                await _close_queued(conn, batch_id, "expired")
        return [batch_id for (batch_id,) in due]

    async def claim(
        self, worker: str, count: int, lease_until: datetime, now: datetime
    ) -> builtins.list[Claim]:
        """Up to ``count`` queued lines, leased to ``worker`` until ``lease_until``: from the
        oldest batches in progress with a line ready, a share of ``count`` from each (so
        that one tenant's big batch does not hold every other's back), skipping lines held
        back until later (``not_before``)."""
        if count <= 0:
            return []
        ready = (batch_lines.c.state == "queued") & (
            batch_lines.c.not_before.is_(None) | (batch_lines.c.not_before <= now)
        )
        has_ready = exists().where(batch_lines.c.batch_id == batches.c.id, ready)
        async with self._db.engine.connect() as conn:
            candidates = (
                (
                    await conn.execute(
                        select(batches.c.id)
                        .where(
                            batches.c.status == "in_progress",
                            batches.c.expired_at.is_(None),
                            has_ready,
                        )
                        .order_by(batches.c.created_at, batches.c.id)
                        .limit(_CLAIM_BATCHES)
                    )
                )
                .scalars()
                .all()
            )
        claims: builtins.list[Claim] = []
        share = -(-count // max(1, len(candidates)))
        for batch_id in candidates:
            wanted = min(share, count - len(claims))
            if wanted <= 0:
                break
            claims += await self._claim_from(batch_id, worker, wanted, lease_until, now)
        return claims

    async def _claim_from(
        self, batch_id: str, worker: str, count: int, lease_until: datetime, now: datetime
    ) -> builtins.list[Claim]:
        lock = " FOR UPDATE SKIP LOCKED" if self._db.dialect == "postgresql" else ""
        # The lines are picked in a CTE, which PostgreSQL evaluates once: as a subquery of
        # the UPDATE's WHERE it may run again for each row, and claim more than ``count``.
        statement = text(
            "WITH picked AS ("
            "SELECT line FROM batch_lines WHERE batch_id = :batch AND state = 'queued' "
            "AND (not_before IS NULL OR not_before <= :now) "
            f"ORDER BY line LIMIT :count{lock}) "
            "UPDATE batch_lines SET state = 'running', lease_owner = :worker, "
            "lease_until = :until, attempts = attempts + 1, not_before = NULL "
            "WHERE batch_id = :batch AND line IN (SELECT line FROM picked) "
            "RETURNING batch_id, line, custom_id, body"
        ).bindparams(
            bindparam("until", lease_until, type_=UTCDateTime()),
            bindparam("now", now, type_=UTCDateTime()),
            worker=worker,
            count=count,
            batch=batch_id,
        )
        async with self._db.writer.begin() as conn:
            rows = (await conn.execute(statement)).all()
        return [Claim(r.batch_id, r.line, r.custom_id, r.body.encode()) for r in rows]

    async def renew(self, claim: Claim, worker: str, lease_until: datetime) -> bool:
        """Extend a running line's lease; False when ``worker`` no longer holds it."""
        async with self._db.writer.begin() as conn:
            renewed = await conn.execute(
                update(batch_lines).where(*_held(claim, worker)).values(lease_until=lease_until)
            )
        return bool(renewed.rowcount == 1)

    async def finish_line(
        self,
        claim: Claim,
        worker: str,
        *,
        status_code: int,
        result: bytes,
        request_id: str,
    ) -> bool:
        """Write a line's answer, once: only while ``worker`` still holds its lease. False
        when it does not (its lease ran out and the line was queued again or taken over)."""
        async with self._db.writer.begin() as conn:
            written = await conn.execute(
                update(batch_lines)
                .where(*_held(claim, worker))
                .values(
                    state="done" if status_code == 200 else "failed",
                    status_code=status_code,
                    result=result.decode(errors="replace"),
                    request_id=request_id,
                    lease_owner=None,
                    lease_until=None,
                )
            )
        return bool(written.rowcount == 1)

    async def release(self, claim: Claim, worker: str, not_before: datetime) -> None:
        """Give a claimed line back to the queue unanswered, not to be claimed before
        ``not_before`` (the gateway refused it for now: its key's rate limit, a full
        deployment); other batches' lines go first meanwhile."""
        async with self._db.writer.begin() as conn:
            await conn.execute(
                update(batch_lines)
                .where(*_held(claim, worker))
                .values(state="queued", lease_owner=None, lease_until=None, not_before=not_before)
            )

    async def take_finalization(self, now: datetime) -> builtins.list[BatchRecord]:
        """The batches this worker is to finalise: those with no line queued or running,
        each moved to ``finalizing`` by one conditional update (one worker wins each), and
        those whose finaliser died ``FINALIZE_RETRY`` ago."""
        open_lines = exists().where(
            batch_lines.c.batch_id == batches.c.id, batch_lines.c.state.in_(OPEN_STATES)
        )
        async with self._db.engine.connect() as conn:
            ready = (
                await conn.execute(
                    select(batches.c.id, batches.c.status).where(
                        batches.c.status.in_(("in_progress", "cancelling")), ~open_lines
                    )
                )
            ).all()
        taken: builtins.list[BatchRecord] = []
        for batch_id, status in ready:
            async with self._db.writer.begin() as conn:
                moved = await conn.execute(
                    update(batches)
                    .where(batches.c.id == batch_id, batches.c.status == status, ~open_lines)
                    .values(status="finalizing", finalizing_at=now)
                )
            if moved.rowcount == 1:
                record = await self.get(batch_id, ANYONE)
                if record is not None:
                    taken.append(record)
        async with self._db.writer.begin() as conn:
            stale = (
                await conn.execute(
                    update(batches)
                    .where(
                        batches.c.status == "finalizing",
                        batches.c.finalizing_at < now - FINALIZE_RETRY,
                    )
                    .values(finalizing_at=now)
                    .returning(batches.c.id)
                )
            ).all()
        for (batch_id,) in stale:
            record = await self.get(batch_id, ANYONE)
            if record is not None:
                taken.append(record)
        return taken

    async def outcomes(self, batch_id: str, *, page: int = 1000) -> AsyncIterator[Outcome]:
        """Every line's end, in input order, read ``page`` lines at a time (a batch's
        answers may not fit in memory at once)."""
        after = 0
        while True:
            async with self._db.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(
                            batch_lines.c.line,
                            batch_lines.c.custom_id,
                            batch_lines.c.state,
                            batch_lines.c.status_code,
                            batch_lines.c.result,
                            batch_lines.c.request_id,
                        )
                        .where(batch_lines.c.batch_id == batch_id, batch_lines.c.line > after)
                        .order_by(batch_lines.c.line)
                        .limit(page)
                    )
                ).all()
            for row in rows:
                yield Outcome(*row)
            if len(rows) < page:
                return
            after = rows[-1].line

    async def open_batches(self, owner: str | None) -> int:
        """How many of ``owner``'s batches are not finished (its quota)."""
        async with self._db.engine.connect() as conn:
            count = await conn.scalar(
                select(func.count())
                .select_from(batches)
                .where(_owned_by(owner), batches.c.status.notin_(FINAL_STATUSES))
            )
        return int(count or 0)

    async def close(
        self,
        batch: BatchRecord,
        *,
        output_file_id: str | None,
        error_file_id: str | None,
        now: datetime,
    ) -> None:
        """``finalizing`` → its last status: cancelled, expired, or completed."""
        if batch.cancelling_at is not None:
            final = {"status": "cancelled", "cancelled_at": now}
        elif batch.expired_at is not None:
            final = {"status": "expired"}
        else:
            final = {"status": "completed", "completed_at": now}
        async with self._db.writer.begin() as conn:
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch.id, batches.c.status == "finalizing")
                .values(output_file_id=output_file_id, error_file_id=error_file_id, **final)
            )

    async def line_counts(self) -> dict[tuple[str, str], int]:
        """Lines by batch status and line state (for the metrics)."""
        async with self._db.engine.connect() as conn:
            rows = await conn.execute(
                select(batches.c.status, batch_lines.c.state, func.count())
                .join(batches, batches.c.id == batch_lines.c.batch_id)
                .where(batches.c.status.notin_(FINAL_STATUSES))
                .group_by(batches.c.status, batch_lines.c.state)
            )
            return {(status, state): int(n) for status, state, n in rows}


def _held(claim: Claim, worker: str) -> tuple[Any, ...]:
    """The conditions that ``worker`` still holds ``claim``'s lease."""
    return (
        batch_lines.c.batch_id == claim.batch_id,
        batch_lines.c.line == claim.line,
        batch_lines.c.state == "running",
        batch_lines.c.lease_owner == worker,
    )


def _owned_by(owner: str | None) -> Any:
    return owned_by(batches.c.key_id, owner)


async def _close_queued(conn: Any, batch_id: str, state: str) -> None:
    await conn.execute(
        update(batch_lines)
        .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "queued")
        .values(state=state)
    )


def _counts(by_state: dict[str, int], total: int) -> Counts:
    failed = sum(by_state.get(s, 0) for s in ("failed", "cancelled", "expired"))
    return Counts(
        total=total,
        completed=by_state.get("done", 0),
        failed=failed,
        queued=by_state.get("queued", 0),
        running=by_state.get("running", 0),
    )
