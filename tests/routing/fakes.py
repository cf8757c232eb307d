"""Deployments for balancing and health tests: a settable clock, no real backends."""

from __future__ import annotations

from typing import Any, cast

from sluice.backends.base import Backend
from sluice.routing.deployment import Deployment
from sluice.routing.health import DeploymentHealth, EjectionPool
from sluice.routing.settings import HealthSettings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def deployments(
    clock: FakeClock,
    count: int = 2,
    weights: list[float] | None = None,
    max_concurrency: int | None = None,
    **health: Any,
) -> list[Deployment]:
    """``count`` deployments of one model, each with its health, sharing one pool."""
    settings = HealthSettings(**health)
    pool = EjectionPool(settings.max_ejected_percent)
    built = []
    for index in range(count):
        weight = weights[index] if weights is not None else 1.0
        d = Deployment(
            f"d{index}", cast(Backend, None), "m", weight, max_concurrency=max_concurrency
        )
        d.health = DeploymentHealth(settings, pool, clock)
        built.append(d)
    return built


def health(d: Deployment) -> DeploymentHealth:
    assert d.health is not None
    return d.health
