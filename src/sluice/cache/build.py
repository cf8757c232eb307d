"""The cache, built once from the settings in the app's lifespan (`sluice.app`)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from sluice.cache.key import tag
from sluice.cache.metrics import CacheMetrics
from sluice.cache.semantic import RouterEmbedder, SemanticCache
from sluice.cache.step import CacheStep, ModelPolicy
from sluice.cache.tiers import AnswerStore, MemoryTier, RedisTier
from sluice.cache.verify import SecondCheck
from sluice.errors import ServiceUnavailableError
from sluice.routing.router import Router
from sluice.settings import Settings
from sluice.store.channel import Channel

FLUSH_CHANNEL = "sluice:cache:flush"


@dataclass
class Cache:
    step: CacheStep
    store: AnswerStore
    policies: dict[str, ModelPolicy]
    """Served model -> how it is cached; replaced in place by a reload (`reconfigure`)."""
    channel: Channel | None = None
    """Flushes reach every process's memory tier through it (with Redis)."""
    processes: int = 1

    @property
    def flushes_everywhere(self) -> bool:
        """Whether a flush reaches every process's memory tier (one process, or Redis)."""
        return self.channel is not None or self.processes == 1 or self.store.memory is None

    def start(self) -> None:
        if self.channel is not None:
            self.channel.start()

    def reconfigure(self, settings: Settings) -> None:
        self.policies.clear()
        self.policies.update(cache_policies(settings))

    async def flush(self, namespace: str | None, model: str | None) -> int:
        """Drop the stored answers of a namespace (``key:<id>``, ``team:<name>``, ``global``,
        ``master``, ``public``), of a served model, of both, or every one: from Redis, and
        from every process's memory. Returns how many were found here and on Redis."""
        tags = (
            tag(namespace) if namespace is not None else None,
            tag(model) if model is not None else None,
        )
        try:
            removed = await self.store.flush(*tags)
        except (aioredis.RedisError, OSError):
            raise ServiceUnavailableError(
                "This process's memory tier was flushed, but Redis did not answer: the "
                "answers stored there (and other processes' memory) are not flushed. Retry.",
                code="cache_flush_incomplete",
            ) from None
        if self.channel is not None and not await self.channel.publish(orjson.dumps(tags).decode()):
            raise ServiceUnavailableError(
                "The answers on Redis were flushed, but other processes could not be told to "
                "flush their memory. Retry.",
                code="cache_flush_incomplete",
            )
        return removed

    def _flush_memory(self, message: str) -> None:
        """Another process flushed (or this one: its own message comes back too)."""
        if self.store.memory is None:
            return
        try:
            namespace_tag, model_tag = orjson.loads(message)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return
        self.store.memory.flush(namespace_tag, model_tag)

    def _forget_memory(self) -> None:
        """Listening again after a gap: a flush may have been missed, so drop everything."""
        if self.store.memory is not None:
            self.store.memory.flush(None, None)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.store.close()


def cache_policies(settings: Settings) -> dict[str, ModelPolicy]:
    """The models whose answers are cached, each with its TTL and semantic opt-in."""
    cache = settings.cache
    policies = {}
    for model in settings.models:
        own = model.cache
        enabled = own.enabled if own.enabled is not None else cache.enabled
        if enabled:
            policies[model.name] = ModelPolicy(own.ttl or cache.ttl, own.semantic)
    return policies


def build_cache(
    settings: Settings,
    router: Router,
    registry: CollectorRegistry,
    redis: aioredis.Redis | None,
) -> Cache | None:
    """The cache, or None when no model is cached (no step in the pipeline at all)."""
    policies = cache_policies(settings)
    if not policies:
        return None
    cache = settings.cache
    metrics = CacheMetrics(registry)
    memory = (
        MemoryTier(cache.memory_bytes, on_evict=metrics.evicted) if cache.memory_bytes else None
    )
    shared = redis if cache.redis else None
    store = AnswerStore(
        memory, RedisTier(shared) if shared is not None else None, on_stored=metrics.stored
    )
    semantic = None
    if cache.semantic.embedding_model is not None:
        semantic = SemanticCache(
            cache.semantic,
            RouterEmbedder(router, cache.semantic.embedding_model),
            store,
            metrics,
            SecondCheck() if cache.semantic.verify else None,
            shared,
        )
    step = CacheStep(cache, policies, store, metrics, semantic)
    built = Cache(step, store, policies, processes=settings.server.workers)
    if redis is not None:
        built.channel = Channel(redis, FLUSH_CHANNEL, built._flush_memory, built._forget_memory)
    return built
