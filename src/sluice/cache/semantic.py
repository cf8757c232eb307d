"""The semantic cache: answer a prompt that means the same as one answered before.

Opt-in per model (``cache: {semantic: true}``) or per key (``semantic_cache``). Only chat
requests whose last message is the user's plain text take part. Their *scope* pins
everything but that text (namespace, model, parameters, system prompt and earlier turns:
`sluice.cache.key.scope_of`), so a hit can only differ from the request in how its last
question is worded. Within the scope the last turn is embedded (the configured embedding
model, served like any other: `RouterEmbedder`), compared by cosine similarity with the
prompts stored there, and the best one at or above the threshold is taken if the second
check (`sluice.cache.verify`) agrees that nothing that changes the answer differs (numbers,
names, negation). The threshold's default was chosen on labelled paraphrase pairs
(docs/semantic-cache.md).

The index is in process memory (numpy: a scope holds few prompts, and a matrix product over
them costs microseconds), bounded by ``max_entries`` prompts in all: the least recently
used scopes are dropped first, then a scope's oldest prompts. With the Redis tier, every
stored prompt is also appended to its scope's Redis stream, and a lookup first reads what
other processes added since its last look: every replica finds every replica's answers.
The answers themselves stay in the answer store; an index entry whose answer expired is
skipped when found, and goes with its scope's oldest.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
import redis.asyncio as aioredis

from sluice.cache.answer import Answer
from sluice.cache.metrics import CacheMetrics
from sluice.cache.settings import SemanticSettings
from sluice.cache.tiers import AnswerStore, Location
from sluice.cache.verify import SecondCheck, Signals, signals
from sluice.observability.outages import OutageLog
from sluice.routing.router import Router

log = logging.getLogger("sluice.cache")
STREAM_PREFIX = "sluice:semantic:"
_STREAM_LENGTH = 1000  # prompts kept per scope on Redis (approximately: MAXLEN ~)
_CANDIDATES = 3  # best matches tried when the first one's answer has expired

Vector = np.ndarray[Any, np.dtype[np.float32]]


class Embedder(Protocol):
    async def __call__(self, text: str) -> Vector: ...


@dataclass(slots=True)
class Remember:
    """A prompt to index once its answer is stored."""

    scope: str
    text: str
    vector: Vector


class _Scope:
    """One scope's prompts: their vectors in a matrix with room to grow (rows are added in
    amortised constant time), oldest first."""

    __slots__ = ("_known", "_matrix", "names", "signals", "synced")

    def __init__(self, dimensions: int) -> None:
        self._matrix: Vector = np.empty((8, dimensions), np.float32)
        self.names: list[str] = []
        self._known: set[str] = set()
        self.signals: list[Signals] = []
        """Each stored prompt read once for the second check."""
        self.synced = "0-0"
        """The last Redis stream id read into this scope."""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def vectors(self) -> Vector:
        return self._matrix[: len(self.names)]

    def add(self, vector: Vector, name: str, prompt: Signals) -> bool:
        """Add a prompt; False when its answer is indexed already (this process's own
        entry, read back from Redis)."""
        if name in self._known:
            return False
        rows = len(self.names)
        if rows == len(self._matrix):
            grown = np.empty((2 * rows, self._matrix.shape[1]), np.float32)
            grown[:rows] = self._matrix
            self._matrix = grown
        self._matrix[rows] = vector
        self.names.append(name)
        self._known.add(name)
        self.signals.append(prompt)
        return True

    def drop_oldest(self, count: int) -> None:
        keep = len(self.names) - count
        self._matrix[:keep] = self._matrix[count : count + keep]
        self._known.difference_update(self.names[:count])
        del self.names[:count]
        del self.signals[:count]


class SemanticCache:
    def __init__(
        self,
        settings: SemanticSettings,
        embed: Embedder,
        store: AnswerStore,
        metrics: CacheMetrics,
        check: SecondCheck | None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        self._settings = settings
        self._embed = embed
        self._store = store
        self._metrics = metrics
        self._check = check
        self._redis = redis
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()
        self._entries = 0
        self._outages = OutageLog(log, "semantic cache unavailable (answering from upstream)")

    async def lookup(
        self, scope: str, text: str, namespace_tag: str, model_tag: str
    ) -> tuple[tuple[Answer, float] | None, Remember | None]:
        """The best stored answer for ``text`` in ``scope`` and its similarity (None when
        none passes), and what to index once this request's own answer is stored."""
        try:
            vector = await self._embed(text)
        except Exception as exc:  # an embedding failure costs the hit, never the request
            self._outages.failed(exc)
            return None, None
        remember = Remember(scope, text, vector)
        if self._redis is not None:
            await self._sync(scope)
        held = self._scopes.get(scope)
        if held is None or not held:
            return None, remember
        self._scopes.move_to_end(scope)
        similarities = held.vectors @ vector
        order = np.argsort(-similarities)[:_CANDIDATES]
        asked: Signals | None = None
        for row in order:
            similarity = float(similarities[row])
            if similarity < self._settings.threshold:
                break
            name = held.names[row]
            answer = self._store.get_now(name)
            if answer is None:
                answer = await self._store.get_shared(_location(name))
            if answer is None:
                continue  # expired or flushed (its row goes with the oldest, in time)
            if self._check is not None:
                asked = asked or signals(text)
                reason = self._check.reason(asked, held.signals[row])
                if reason is not None:
                    self._metrics.rejected(reason)
                    continue
            return (answer, similarity), remember
        return None, remember

    def remember(self, prompt: Remember, location: Location, ttl: float) -> None:
        """Index ``prompt`` as the question ``location``'s answer was given to (kept on
        Redis, when shared, as long as that answer)."""
        self._add(prompt.scope, prompt.vector, location.name, prompt.text)
        if self._redis is not None:
            self._store.background(self._publish(prompt, location.name, ttl))

    def _add(self, scope: str, vector: Vector, name: str, text: str) -> None:
        """Index one prompt; past ``max_entries`` prompts in all, drop the least recently
        used scopes, and then this scope's oldest prompts (a quarter at a time, so the
        matrix is not moved on every insert)."""
        held = self._scopes.get(scope)
        if held is None:
            held = self._scopes[scope] = _Scope(vector.shape[0])
        if not held.add(vector, name, signals(text)):
            return
        self._entries += 1
        self._scopes.move_to_end(scope)
        limit = self._settings.max_entries
        while self._entries > limit and len(self._scopes) > 1:
            _, dropped = self._scopes.popitem(last=False)
            self._entries -= len(dropped)
        if self._entries > limit:
            excess = max(self._entries - limit, len(held) // 4)
            held.drop_oldest(excess)
            self._entries -= excess

    async def _publish(self, prompt: Remember, name: str, ttl: float) -> None:
        assert self._redis is not None
        stream = STREAM_PREFIX + prompt.scope
        fields = {"v": prompt.vector.astype(np.float32).tobytes(), "t": prompt.text, "n": name}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(stream, fields, maxlen=_STREAM_LENGTH, approximate=True)  # type: ignore[arg-type]
                # The stream lives as long as its longest-lived answer: an entry with a
                # short max-age must not cut it short for the older ones.
                pipe.expire(stream, max(1, int(ttl)), gt=True)
                pipe.expire(stream, max(1, int(ttl)), nx=True)
                await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            self._outages.failed(exc)

    async def _sync(self, scope: str) -> None:
        """Read what other processes indexed in ``scope`` since the last look."""
        assert self._redis is not None
        held = self._scopes.get(scope)
        start = "(" + held.synced if held is not None else "-"
        try:
            entries = await self._redis.xrange(STREAM_PREFIX + scope, min=start)
        except (aioredis.RedisError, OSError) as exc:
            self._outages.failed(exc)
            return
        for entry_id, fields in entries or ():
            if not isinstance(entry_id, bytes) or fields is None:
                continue
            try:
                vector = np.frombuffer(_as_bytes(fields[b"v"]), dtype=np.float32)
                text = _as_bytes(fields[b"t"]).decode()
                name = _as_bytes(fields[b"n"]).decode()
            except (KeyError, UnicodeDecodeError, ValueError):
                continue  # not an entry this code wrote
            self._add(scope, vector, name, text)
            synced = self._scopes.get(scope)
            if synced is not None:
                synced.synced = entry_id.decode()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _location(name: str) -> Location:
    namespace_tag, model_tag, key = name.split(":", 2)
    return Location(namespace_tag, model_tag, key)


class RouterEmbedder:
    """Embeds with a model the gateway serves (a local-embedding model, or any remote
    embeddings deployment): the plan's first deployment, called directly."""

    def __init__(self, router: Router, model: str) -> None:
        self._router = router
        self._model = model

    async def __call__(self, text: str) -> Vector:
        plan = self._router.plan(self._model)
        deployment = plan.candidates[0]
        call = deployment.call(
            "embeddings",
            self._model,
            {"model": self._model, "input": text},
            None,
            "cache-" + os.urandom(8).hex(),
            False,
        )
        reply = await deployment.backend.send(call)
        data = orjson.loads(reply.body)["data"][0]["embedding"]
        vector = np.asarray(data, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector
