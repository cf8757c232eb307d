"""What ``sluice usage`` does: usage and spend read straight from the database."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, cast

import orjson

from sluice.services import database_for
from sluice.settings import Settings
from sluice.store.usage import UsageStore


async def show_usage(
    settings: Settings,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    group_by: Sequence[str],
) -> str:
    database = database_for(settings)
    await database.start()
    try:
        rows = await UsageStore(database).query(
            key_id=key_id,
            model=model,
            since=since.replace(tzinfo=UTC) if since and since.tzinfo is None else since,
            group_by=cast(Sequence[Literal["key", "model", "day"]], group_by),
        )
    finally:
        await database.close()
    return "\n".join(orjson.dumps(row, default=str).decode() for row in rows) or "(no usage)"
