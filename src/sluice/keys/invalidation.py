"""Keeping every replica's key cache honest: revocations and changes reach all of them.

The replica that changes a key drops it from its own cache at once and publishes the key's
hash on a Redis channel (`sluice.store.channel`); every replica listens and drops it too,
and drops every key whenever it starts listening again (what changed meanwhile is unknown).
Without Redis there is one process, and the local drop is all there is.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from sluice.store.channel import Channel

CHANNEL = "sluice:keys:invalidate"


class KeyInvalidation:
    def __init__(self, redis: aioredis.Redis | None, drop: Callable[[str | None], None]) -> None:
        self._drop = drop
        self._channel = (
            Channel(redis, CHANNEL, drop, on_reconnect=lambda: drop(None))
            if redis is not None
            else None
        )

    async def start(self) -> None:
        if self._channel is not None:
            self._channel.start()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def publish(self, key_hash: str) -> None:
        self._drop(key_hash)
        if self._channel is not None:
            await self._channel.publish(key_hash)
