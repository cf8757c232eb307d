"""Keeping every replica's key cache honest: revocations and changes reach all of them.

The replica that changes a key drops it from its own cache at once and publishes the key's
hash on a Redis channel; every replica listens and drops it too. Without Redis there is one
process, and the local drop is all there is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

CHANNEL = "sluice:keys:invalidate"
log = logging.getLogger("sluice.keys")


class KeyInvalidation:
    def __init__(self, redis: aioredis.Redis | None, drop: Callable[[str | None], None]) -> None:
        self._redis = redis
        self._drop = drop
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._redis is not None:
            self._task = asyncio.create_task(self._listen(self._redis), name="key-invalidation")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def publish(self, key_hash: str) -> None:
        self._drop(key_hash)
        if self._redis is None:
            return
        try:
            await self._redis.publish(CHANNEL, key_hash)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("could not publish a key invalidation: %s", exc)

    async def _listen(self, redis: aioredis.Redis) -> None:
        backoff = 0.1
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    # Whatever changed while we were not listening is unknown: start afresh.
                    self._drop(None)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            self._drop(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except (aioredis.RedisError, OSError) as exc:
                log.warning("key invalidation channel lost (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
