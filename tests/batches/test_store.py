"""The batch store on SQLite and PostgreSQL: claims and leases, answers written once,
lines given back, lapsed leases, cancel and expiry, finalisation by one worker."""

from __future__ import annotations

from datetime import timedelta

from sluice.batches.owners import ANYONE
from sluice.batches.store import BatchStore
from sluice.batches.validate import Line
from sluice.store.database import Database
from sluice.store.periods import utcnow

LEASE = timedelta(minutes=5)


async def new_batch(store: BatchStore, lines: int = 4, key: str | None = "key_a") -> str:
    batch = await store.create(
        key_id=key,
        endpoint="/v1/chat/completions",
        input_file_id="file-" + "0" * 24,
        completion_window=timedelta(hours=24),
        window_name="24h",
        metadata=None,
        lines=[Line(i, f"c{i}", b'{"model":"m"}') for i in range(1, lines + 1)],
        errors=[],
    )
    return batch.id


async def test_two_workers_never_claim_the_same_line(db: Database) -> None:
    store = BatchStore(db)
    await new_batch(store, 5)
    now = utcnow()
    first = await store.claim("w1", 3, now + LEASE, now)
    second = await store.claim("w2", 3, now + LEASE, now)
    assert len(first) == 3
    assert len(second) == 2
    assert {c.line for c in first}.isdisjoint({c.line for c in second})
    assert await store.claim("w3", 3, now + LEASE, now) == []


async def test_an_answer_is_written_once_by_the_lease_holder_only(db: Database) -> None:
    store = BatchStore(db)
    batch_id = await new_batch(store, 1)
    now = utcnow()
    (claim,) = await store.claim("w1", 1, now + LEASE, now)
    assert not await store.finish_line(claim, "w2", status_code=200, result=b"{}", request_id="r")
    assert await store.finish_line(claim, "w1", status_code=200, result=b"{}", request_id="r")
    assert not await store.finish_line(claim, "w1", status_code=200, result=b"{}", request_id="r")
    batch = await store.get(batch_id, ANYONE)
    assert batch is not None
    assert batch.counts.completed == 1


async def test_a_lapsed_lease_queues_the_line_again_then_gives_up(db: Database) -> None:
    store = BatchStore(db)
    batch_id = await new_batch(store, 1)
    now = utcnow()
    for attempt in range(1, 4):
        (claim,) = await store.claim(f"w{attempt}", 1, now - timedelta(seconds=1), now)
        assert await store.requeue_lapsed(now, max_attempts=3) == 1
    batch = await store.get(batch_id, ANYONE)
    assert batch is not None
    assert batch.counts.failed == 1  # claimed three times by workers that died: failed
    outcomes = [o async for o in store.outcomes(batch_id)]
    assert outcomes[0].status_code == 500
    assert "batch_line_abandoned" in (outcomes[0].result or "")
    assert not await store.finish_line(claim, "w3", status_code=200, result=b"{}", request_id="r")


async def test_a_line_given_back_waits_for_its_time_and_lets_others_go(db: Database) -> None:
    store = BatchStore(db)
    held = await new_batch(store, 1, key="slow")
    other = await new_batch(store, 1, key="fast")
    now = utcnow()
    claims = await store.claim("w", 2, now + LEASE, now)
    slow = next(c for c in claims if c.batch_id == held)
    await store.release(slow, "w", now + timedelta(seconds=30))
    assert await store.claim("w", 2, now + LEASE, now) == []
    later = now + timedelta(seconds=31)
    (again,) = await store.claim("w", 2, later + LEASE, later)
    assert again.batch_id == held
    assert other in {c.batch_id for c in claims}


async def test_claims_spread_over_batches(db: Database) -> None:
    store = BatchStore(db)
    first = await new_batch(store, 10)
    second = await new_batch(store, 10)
    now = utcnow()
    claims = await store.claim("w", 4, now + LEASE, now)
    assert sorted(c.batch_id for c in claims) == sorted([first, first, second, second])


async def test_cancel_closes_queued_lines_even_those_given_back_later(db: Database) -> None:
    store = BatchStore(db)
    batch_id = await new_batch(store, 3)
    now = utcnow()
    (running,) = await store.claim("w", 1, now + LEASE, now)
    assert await store.cancel(batch_id)
    assert not await store.cancel(batch_id)
    await store.release(running, "w", now)  # refused for now, after the cancel
    assert await store.claim("w", 3, now + LEASE, now) == []
    await store.close_unclaimable()
    (taken,) = await store.take_finalization(now)
    assert taken.id == batch_id
    assert await store.take_finalization(now) == []  # one worker finalises
    await store.close(taken, output_file_id=None, error_file_id=None, now=now)
    batch = await store.get(batch_id, ANYONE)
    assert batch is not None
    assert batch.status == "cancelled"
    assert batch.counts.failed == 3


async def test_expiry_closes_what_did_not_run(db: Database) -> None:
    store = BatchStore(db)
    batch_id = await new_batch(store, 2)
    now = utcnow()
    (claim,) = await store.claim("w", 1, now + LEASE, now)
    assert await store.expire_due(now + timedelta(hours=25)) == [batch_id]
    assert await store.take_finalization(now) == []  # a line still runs
    await store.finish_line(claim, "w", status_code=200, result=b"{}", request_id="r")
    (taken,) = await store.take_finalization(now)
    await store.close(taken, output_file_id=None, error_file_id=None, now=now)
    batch = await store.get(batch_id, ANYONE)
    assert batch is not None
    assert batch.status == "expired"
    assert (batch.counts.completed, batch.counts.failed) == (1, 1)


async def test_owners_see_their_own(db: Database) -> None:
    store = BatchStore(db)
    mine = await new_batch(store, 1, key="key_a")
    await new_batch(store, 1, key="key_b")
    assert await store.get(mine, "key_b") is None
    assert await store.get(mine, None) is None  # the master key's are those without a key
    page, more = await store.list("key_a", limit=10, after=None)
    assert [b.id for b in page] == [mine]
    assert not more
    assert await store.list("key_b", limit=10, after=mine) == ([], False)
    assert await store.open_batches("key_a") == 1
