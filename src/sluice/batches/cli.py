"""What ``sluice batches list|show|cancel`` do: batches read and cancelled straight on the
database, for an operator (every key's batches)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from sluice.batches.owners import ANYONE
from sluice.batches.store import BatchRecord, BatchStore
from sluice.services import database_for
from sluice.settings import Settings


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[BatchStore]:
    database = database_for(settings)
    await database.start()
    try:
        yield BatchStore(database)
    finally:
        await database.close()


def _line(batch: BatchRecord) -> str:
    view: dict[str, Any] = {"key_id": batch.key_id, **batch.to_openai()}
    view["lines"] = {"queued": batch.counts.queued, "running": batch.counts.running}
    return orjson.dumps(view).decode()


async def list_batches(
    settings: Settings, status: str | None, key_id: str | None, limit: int
) -> str:
    async with _store(settings) as store:
        found = await store.recent(limit=limit, status=status, key_id=key_id)
    return "\n".join(_line(b) for b in found) or "(no batches)"


async def show_batch(settings: Settings, batch_id: str) -> str:
    async with _store(settings) as store:
        batch = await store.get(batch_id, ANYONE)
    if batch is None:
        raise LookupError(f"no batch {batch_id!r}")
    return orjson.dumps(
        {"key_id": batch.key_id, **batch.to_openai()}, option=orjson.OPT_INDENT_2
    ).decode()


async def cancel_batch(settings: Settings, batch_id: str) -> str:
    async with _store(settings) as store:
        batch = await store.get(batch_id, ANYONE)
        if batch is None:
            raise LookupError(f"no batch {batch_id!r}")
        if not await store.cancel(batch_id):
            raise LookupError(
                f"batch {batch_id} is {batch.status}: only one in progress can be cancelled"
            )
    return f"cancelling {batch_id}: no new line starts; running lines finish, then it is finalised"
