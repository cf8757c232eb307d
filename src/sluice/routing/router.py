"""The model table: public model names, their deployments, and the plan for a request."""

from __future__ import annotations

import random
from collections.abc import Iterable

from sluice.backends.base import Backend
from sluice.routing.deployment import Deployment
from sluice.routing.plan import ModelRoute, Plan


class Router:
    """Plans requests for public model names."""

    def __init__(self, routes: Iterable[ModelRoute], seed: int | None = None):
        self._routes = {route.name: route for route in routes}
        self._rng = random.Random(seed)

    @property
    def model_names(self) -> list[str]:
        return list(self._routes)

    def knows(self, model: str) -> bool:
        return model in self._routes

    def plan(self, model: str) -> Plan:
        """The candidates for ``model`` (which `knows` must have accepted)."""
        route = self._routes[model]
        if route.fixed is not None:
            return route.fixed
        return Plan(
            model,
            route.order(self._rng),
            route.fallbacks,
            route.context_window_fallbacks,
            route.content_policy_fallbacks,
        )

    def deployments(self, model: str) -> list[Deployment]:
        return self._routes[model].deployments

    def backends(self) -> list[Backend]:
        return [d.backend for r in self._routes.values() for d in r.deployments]
