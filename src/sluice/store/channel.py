"""A Redis pub/sub channel every process listens on: how one replica's change (a key
revoked, a cache flushed) reaches the in-process state of all of them.

The listener reconnects with a backoff when Redis goes away, and calls ``on_reconnect``
each time it (re)subscribes: whatever was published while it was not listening is lost, so
the receiver should start afresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

log = logging.getLogger("sluice.channel")


class Channel:
    def __init__(
        self,
        redis: aioredis.Redis,
        name: str,
        on_message: Callable[[str], None],
        on_reconnect: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = redis
        self.name = name
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name=f"channel {self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def publish(self, message: str) -> bool:
        """Send ``message`` to every listener (this process's too); False when Redis is
        unreachable."""
        try:
            await self._redis.publish(self.name, message)
        except (aioredis.RedisError, OSError) as exc:
            log.warning("could not publish on %s: %s", self.name, exc)
            return False
        return True

    def _deliver(self, receive: Callable[..., None], *message: str) -> None:
        """A receiver's failure is logged: it must not end the listening (revocations and
        flushes would silently stop reaching this process)."""
        try:
            receive(*message)
        except Exception:
            log.exception("channel %s: a message could not be handled", self.name)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.name)
                    self._deliver(self._on_reconnect)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            text = data.decode() if isinstance(data, bytes) else str(data)
                            self._deliver(self._on_message, text)
            except asyncio.CancelledError:
                raise
            except (aioredis.RedisError, OSError) as exc:
                log.warning("channel %s lost (%s); retrying", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
