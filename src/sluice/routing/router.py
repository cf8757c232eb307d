"""The model table: public model names, their deployments, and the choice between them."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from sluice.backends.base import Backend
from sluice.errors import ModelNotFoundError


@dataclass(slots=True)
class Deployment:
    """One backend that serves a public model."""

    id: str
    backend: Backend
    upstream_model: str
    weight: float
    stream_usage: bool = True
    """Ask the upstream for a usage chunk on streams (stripped unless the client asked)."""


@dataclass(slots=True)
class ModelRoute:
    name: str
    deployments: list[Deployment]
    _weights: list[float]

    def pick(self, rng: random.Random) -> Deployment:
        """Weighted random choice (health and load awareness come with the resilience work)."""
        if len(self.deployments) == 1:
            return self.deployments[0]
        return rng.choices(self.deployments, weights=self._weights)[0]


class Router:
    """Resolves a public model name to a deployment."""

    def __init__(self, routes: Iterable[tuple[str, list[Deployment]]], seed: int | None = None):
        self._routes = {
            name: ModelRoute(name, deps, [d.weight for d in deps]) for name, deps in routes
        }
        self._rng = random.Random(seed)

    @property
    def model_names(self) -> list[str]:
        return list(self._routes)

    def knows(self, model: str) -> bool:
        return model in self._routes

    def route(self, model: str) -> Deployment:
        entry = self._routes.get(model)
        if entry is None:
            raise ModelNotFoundError(
                f"The model '{model[:200]}' does not exist or you do not have access to it.",
                param="model",
            )
        return entry.pick(self._rng)

    def backends(self) -> list[Backend]:
        return [d.backend for r in self._routes.values() for d in r.deployments]
