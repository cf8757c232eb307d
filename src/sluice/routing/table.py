"""The model table built from settings: each public model's deployments and fallbacks, and
the aliases that split a public name across models (`sluice.routing.versions`).

A table is never changed once built: a reload or a change of weights builds another and
the router swaps it in whole (`Router.swap`), so a request sees one table from its plan
to its end. Rebuilding from new settings keeps every deployment whose settings did not
change (same model, same id, same settings): its backend, connection pool and health go
on as they were; only new or changed deployments get a new backend (`Built.fresh`), and
the old ones nothing uses any more are handed back to be closed (`Built.retired`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sluice.backends.registry import ProviderRegistry
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.balancer import POLICIES, Balancer
from sluice.routing.capacity import LoadShedding
from sluice.routing.deployment import Deployment
from sluice.routing.health import Clock, DeploymentHealth, EjectionPool
from sluice.routing.plan import ModelRoute
from sluice.routing.versions import Alias
from sluice.settings import DeploymentSettings, Settings

DeploymentKey = tuple[str, str]
"""(public model, deployment id)."""

log = logging.getLogger("sluice.routing")


@dataclass(frozen=True, slots=True)
class Table:
    routes: dict[str, ModelRoute]
    aliases: dict[str, Alias] = field(default_factory=dict)
    generation: int = 1
    """1 for the table built at start-up, one more for each table swapped in since."""
    specs: dict[DeploymentKey, tuple[DeploymentSettings, Deployment]] = field(default_factory=dict)
    """Each deployment with the settings it was built from (what a reload compares)."""
    names: list[str] = field(init=False)
    """Every public name: models, then aliases (``GET /v1/models``)."""
    served: frozenset[str] = field(init=False)
    shadowed: bool = field(init=False)
    """Some alias mirrors its traffic to a shadow model."""

    def __post_init__(self) -> None:
        names = [*self.routes, *self.aliases]
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "served", frozenset(names))
        shadowed = any(alias.shadow is not None for alias in self.aliases.values())
        object.__setattr__(self, "shadowed", shadowed)

    def deployments(self) -> list[Deployment]:
        return [d for route in self.routes.values() for d in route.deployments]

    def with_alias(self, alias: Alias) -> Table:
        """The next table: this one with ``alias`` replaced (its weights changed)."""
        return dataclasses.replace(
            self, aliases={**self.aliases, alias.name: alias}, generation=self.generation + 1
        )


@dataclass(frozen=True, slots=True)
class Built:
    table: Table
    fresh: list[Deployment]
    """Deployments with a new backend: to be started before the table is used."""
    retired: list[Deployment]
    """The previous table's deployments that the new one does not use: to be closed once
    the requests still on them have finished."""


def build_table(
    settings: Settings,
    providers: ProviderRegistry,
    previous: Table | None = None,
    metrics: GatewayMetrics | None = None,
    clock: Clock = time.monotonic,
    shedding: LoadShedding | None = None,
) -> Built:
    """The table for ``settings``, reusing ``previous``'s unchanged deployments (with
    their health). A model with several deployments gets a balancer and per-deployment
    outlier detection; one with a single deployment has nothing to balance. ``shedding``
    gives each new deployment its concurrency cap and queue (a kept one keeps its own,
    with the requests it holds)."""
    health = settings.resilience.health
    reusable = previous.specs if previous is not None else {}
    routes: dict[str, ModelRoute] = {}
    specs: dict[DeploymentKey, tuple[DeploymentSettings, Deployment]] = {}
    fresh: list[Deployment] = []
    for model in settings.models:
        deployments = []
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            key = (model.name, name)
            kept = reusable.get(key)
            if kept is not None and kept[0] == spec and key not in specs:
                deployment = kept[1]
            else:
                described = providers.describe(spec, model.name)
                deployment = Deployment(
                    name,
                    providers.build(name, spec),
                    described.upstream_model,
                    spec.weight,
                    described.stream_usage,
                    max_concurrency=described.max_concurrency,
                )
                if shedding is not None:
                    deployment.capacity = shedding.capacity(
                        model.name, name, described.max_concurrency
                    )
                fresh.append(deployment)
            specs.setdefault(key, (spec, deployment))
            deployments.append(deployment)
        balancer = None
        if len(deployments) > 1:
            pool = EjectionPool(health.max_ejected_percent)
            for deployment in deployments:
                if deployment.health is None:
                    deployment.health = DeploymentHealth(
                        health, pool, clock, _ejected(metrics, model.name, deployment.id)
                    )
                else:  # kept by a reload: its ejection state and statistics go on
                    deployment.health.move_to(pool)
            balancer = Balancer(deployments, POLICIES[model.balancing](), clock)
        routes[model.name] = ModelRoute(
            model.name,
            deployments,
            fallbacks=tuple(model.fallbacks),
            context_window_fallbacks=tuple(model.context_window_fallbacks),
            content_policy_fallbacks=tuple(model.content_policy_fallbacks),
            balancer=balancer,
        )
    aliases = {alias.name: Alias.of(alias) for alias in settings.aliases}
    generation = previous.generation + 1 if previous is not None else 1
    table = Table(routes, aliases, generation, specs)
    retired: list[Deployment] = []
    if previous is not None:
        kept_ids = {id(d) for d in table.deployments()}
        retired = [d for d in previous.deployments() if id(d) not in kept_ids]
    return Built(table, fresh, retired)


def _ejected(
    metrics: GatewayMetrics | None, model: str, deployment: str
) -> Callable[[str, float], None]:
    def ejected(reason: str, seconds: float) -> None:
        log.warning(
            "deployment %s of model %s ejected for %.1f s (%s)", deployment, model, seconds, reason
        )
        if metrics is not None:
            metrics.deployment_ejections.labels(model, deployment, reason).inc()

    return ejected
