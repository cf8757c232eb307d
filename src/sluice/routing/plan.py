"""A model's route (its deployments and fallbacks) and the plan for one request."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from sluice.routing.balancer import Balancer, Weighted
from sluice.routing.deployment import Deployment


@dataclass(slots=True)
class ModelRoute:
    name: str
    deployments: list[Deployment]
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    balancer: Balancer | None = None
    """Orders the deployments (`sluice.routing.balancer`); by weight when not given."""
    fixed: Plan | None = field(init=False)
    """The plan of every request, when it cannot vary (one deployment)."""

    def __post_init__(self) -> None:
        if self.balancer is None and len(self.deployments) > 1:
            self.balancer = Balancer(self.deployments, Weighted(), time.monotonic)
        self.fixed = None
        if len(self.deployments) == 1:
            self.fixed = self._plan(self.deployments)

    def plan(self, rng: random.Random) -> Plan:
        """This request's plan: the one every request shares when it cannot vary."""
        if self.fixed is not None:
            return self.fixed
        return self._plan(self.order(rng))

    def _plan(self, candidates: list[Deployment]) -> Plan:
        return Plan(
            self.name,
            candidates,
            self.fallbacks,
            self.context_window_fallbacks,
            self.content_policy_fallbacks,
        )

    def order(self, rng: random.Random) -> list[Deployment]:
        """The deployments in the order to try them: the balancing policy's choice first,
        those out of rotation left out (never all). A single deployment's list is returned
        as it is: it has nothing to be balanced against, and no request should pay for it."""
        if self.balancer is None:
            return self.deployments
        return self.balancer.order(rng)


@dataclass(slots=True)
class Plan:
    """Where one request may go. Never changed once made: requests may share one."""

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
