"""Where answers are kept: an in-process LRU with a byte budget, then (optionally) Redis.

The memory tier is a plain ordered dict: a read moves the entry to the young end, a write
past the byte budget evicts from the old end, and an entry past its expiry is a miss (and
is dropped) when read. The Redis tier keeps the same answers with the same expiry (Redis's
own ``EX``), shared by every process and replica; it is read when the memory tier misses,
and a hit there is copied into memory. A failing Redis is a miss and a skipped write, never
an error for the client: the answer is then fetched from upstream as without a cache.

Entries are stored under ``<namespace tag>:<model tag>:<key>`` (`sluice.cache.key.tag`), so
that a flush by namespace or by model finds them without the names in the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from sluice.cache.answer import Answer
from sluice.observability.outages import OutageLog

log = logging.getLogger("sluice.cache")
REDIS_PREFIX = "sluice:cache:"
_FIELDS = len(Answer._fields)
_EXPIRES = Answer._fields.index("expires_at")
_SCAN_COUNT = 1000


class Location(NamedTuple):
    """Where an answer lives: its key and the tags a flush finds it by (a named tuple, like
    `Answer`, so that a stored entry holds nothing the garbage collector tracks)."""

    namespace_tag: str
    model_tag: str
    key: str

    @property
    def name(self) -> str:
        return f"{self.namespace_tag}:{self.model_tag}:{self.key}"


class MemoryTier:
    """Entries are kept as plain tuples, (the answer's fields..., namespace tag, model tag,
    size): the cyclic garbage collector stops tracking a tuple of plain values, so a full
    tier adds next to nothing to its passes, each of which is a pause for every request in
    flight (the figures: docs/architecture.md). A named tuple would not do: only exact
    tuples are untracked."""

    def __init__(
        self,
        max_bytes: int,
        *,
        on_evict: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self.bytes = 0
        self._on_evict = on_evict
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Answer | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry[_EXPIRES] <= self._clock():
            self._drop(name)
            return None
        self._entries.move_to_end(name)
        return Answer._make(entry[:_FIELDS])

    def put(self, location: Location, answer: Answer) -> None:
        size = answer.size
        if size > self._max_bytes or answer.expires_at <= self._clock():
            return
        name = location.name
        if name in self._entries:
            self._drop(name)
        self._entries[name] = (*answer, location.namespace_tag, location.model_tag, size)
        self.bytes += size
        evicted = 0
        while self.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            evicted += 1
        if evicted:
            self._on_evict(evicted)

    def flush(self, namespace_tag: str | None, model_tag: str | None) -> int:
        """Drop the entries of a namespace, of a model, of both, or (neither) all."""
        doomed = [
            name
            for name, entry in self._entries.items()
            if (namespace_tag is None or entry[_FIELDS] == namespace_tag)
            and (model_tag is None or entry[_FIELDS + 1] == model_tag)
        ]
        for name in doomed:
            self._drop(name)
        return len(doomed)

    def _drop(self, name: str) -> None:
        self.bytes -= self._entries.pop(name)[-1]


class RedisTier:
    """Answers on Redis. After a failure the tier is skipped for ``rest`` seconds: a Redis
    that stalls would otherwise add its timeout to every miss (and hold a pooled
    connection for each)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = REDIS_PREFIX,
        *,
        rest: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._rest = rest
        self._clock = clock
        self._resting_until = 0.0
        self._outages = OutageLog(log, "cache tier on Redis unavailable (serving from upstream)")

    @property
    def resting(self) -> bool:
        return self._clock() < self._resting_until

    def _failed(self, exc: BaseException) -> None:
        self._resting_until = self._clock() + self._rest
        self._outages.failed(exc)

    async def get(self, name: str) -> Answer | None:
        if self.resting:
            return None
        try:
            data = await self._redis.get(self._prefix + name)
        except (aioredis.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        if not isinstance(data, bytes):
            return None
        try:
            return Answer.from_bytes(data)
        except ValueError:
            return None

    async def put(self, location: Location, answer: Answer) -> None:
        left_ms = int((answer.expires_at - time.time()) * 1000)
        if left_ms <= 0 or self.resting:
            return
        try:
            await self._redis.set(self._prefix + location.name, answer.to_bytes(), px=left_ms)
        except (aioredis.RedisError, OSError) as exc:
            self._failed(exc)

    async def flush(self, namespace_tag: str | None, model_tag: str | None) -> int:
        """Remove the matching answers; raises `RedisError`/`OSError` when Redis fails (the
        caller says so: a flush that did not happen must not look done)."""
        pattern = f"{self._prefix}{namespace_tag or '*'}:{model_tag or '*'}:*"
        removed = 0
        batch: list[bytes] = []
        async for name in self._redis.scan_iter(match=pattern, count=_SCAN_COUNT):
            batch.append(name)
            if len(batch) >= _SCAN_COUNT:
                removed += await self._redis.unlink(*batch)
                batch = []
        if batch:
            removed += await self._redis.unlink(*batch)
        return removed


class AnswerStore:
    """The tiers together: read memory then Redis; write both (Redis in the background,
    so storing never delays an answer)."""

    def __init__(
        self,
        memory: MemoryTier | None,
        redis: RedisTier | None,
        *,
        on_stored: Callable[[int, int], None] = lambda size, entries: None,
    ) -> None:
        self.memory = memory
        self.redis = redis
        self._on_stored = on_stored
        self._writes: set[asyncio.Task[None]] = set()

    def get_now(self, name: str) -> Answer | None:
        return self.memory.get(name) if self.memory is not None else None

    async def get_shared(self, location: Location) -> Answer | None:
        """The Redis tier's answer (copied into memory for the next request), or None."""
        if self.redis is None:
            return None
        answer = await self.redis.get(location.name)
        if answer is not None and self.memory is not None:
            self.memory.put(location, answer)
        return answer

    def put(self, location: Location, answer: Answer) -> None:
        if self.memory is not None:
            self.memory.put(location, answer)
            self._on_stored(self.memory.bytes, len(self.memory))
        if self.redis is not None:
            self.background(self.redis.put(location, answer))

    async def flush(self, namespace_tag: str | None, model_tag: str | None) -> int:
        removed = 0
        if self.memory is not None:
            removed = self.memory.flush(namespace_tag, model_tag)
            self._on_stored(self.memory.bytes, len(self.memory))
        if self.redis is not None:
            removed += await self.redis.flush(namespace_tag, model_tag)
        return removed

    def background(self, write: Coroutine[Any, Any, None]) -> None:
        """Run a write to Redis without holding up the request; `close` waits for it."""
        task = asyncio.create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        """Let the writes under way finish."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
