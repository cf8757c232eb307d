"""A model's route (its deployments and fallbacks) and the plan for one request."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sluice.routing.deployment import Deployment


@dataclass(slots=True)
class ModelRoute:
    name: str
    deployments: list[Deployment]
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    _weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self._weights = [d.weight for d in self.deployments]

    def order(self, rng: random.Random) -> list[Deployment]:
        """The deployments in the order to try them: a weighted random choice first."""
        if len(self.deployments) == 1:
            return self.deployments
        first = rng.choices(self.deployments, weights=self._weights)[0]
        return [first, *(d for d in self.deployments if d is not first)]


@dataclass(slots=True)
class Plan:
    model: str
    """The model whose deployments these are: the one the client named, or for an alias
    the version chosen (what the request is charged as)."""
    candidates: list[Deployment]
    """Deployments to try in order: the balancing policy's choice first."""
    fallbacks: tuple[str, ...] = ()
    """Models to plan for, in order, once every candidate failed."""
    context_window_fallbacks: tuple[str, ...] = ()
    """Models to plan for when the prompt did not fit the context window."""
    content_policy_fallbacks: tuple[str, ...] = ()
    """Models to plan for when the upstream refused the content."""
