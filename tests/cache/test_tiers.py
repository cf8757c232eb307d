"""The memory tier: expiry, the byte budget, flushing."""

from __future__ import annotations

from sluice.cache.answer import Answer
from sluice.cache.tiers import Location, MemoryTier


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(size: int, expires_at: float = 2000.0) -> Answer:
    return Answer(200, b"x" * size, None, None, None, 1000.0, expires_at)


def test_an_answer_past_its_expiry_is_a_miss() -> None:
    clock = Clock()
    tier = MemoryTier(10_000, clock=clock)
    where = Location("ns", "m", "k")
    tier.put(where, answer(10, expires_at=1060.0))
    assert tier.get(where.name) is not None
    clock.now = 1060.0
    assert tier.get(where.name) is None
    assert len(tier) == 0
    assert tier.bytes == 0


def test_the_byte_budget_evicts_the_least_recently_used() -> None:
    evicted: list[int] = []
    tier = MemoryTier(3 * answer(300).size, on_evict=evicted.append, clock=Clock())
    first, second, third, fourth = (Location("ns", "m", k) for k in "abcd")
    for where in (first, second, third):
        tier.put(where, answer(300))
    assert tier.get(first.name) is not None  # used: now the youngest
    tier.put(fourth, answer(300))
    assert evicted == [1]
    assert tier.get(second.name) is None
    assert all(tier.get(w.name) is not None for w in (first, third, fourth))
    assert tier.bytes <= 3 * answer(300).size


def test_an_answer_larger_than_the_budget_is_not_kept() -> None:
    tier = MemoryTier(1000, clock=Clock())
    tier.put(Location("ns", "m", "k"), answer(5000))
    assert len(tier) == 0


def test_flush_by_namespace_model_both_or_all() -> None:
    tier = MemoryTier(1_000_000, clock=Clock())
    for ns in ("n1", "n2"):
        for model in ("m1", "m2"):
            tier.put(Location(ns, model, "k"), answer(10))
    assert tier.flush("n1", "m1") == 1
    assert tier.flush("n1", None) == 1
    assert tier.flush(None, "m2") == 1
    assert tier.flush(None, None) == 1
    assert len(tier) == 0
    assert tier.bytes == 0
