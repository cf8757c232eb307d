"""The model table built from settings: each public model's deployments and fallbacks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sluice.backends.registry import ProviderRegistry
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.balancer import POLICIES, Balancer
from sluice.routing.deployment import Deployment
from sluice.routing.health import Clock, DeploymentHealth, EjectionPool
from sluice.routing.plan import ModelRoute
from sluice.settings import Settings

log = logging.getLogger("sluice.routing")


def build_table(
    settings: Settings,
    providers: ProviderRegistry,
    metrics: GatewayMetrics | None = None,
    clock: Clock = time.monotonic,
) -> list[ModelRoute]:
    table = []
    health = settings.resilience.health
    for model in settings.models:
        deployments = []
        pool = EjectionPool(health.max_ejected_percent)
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            described = providers.describe(spec, model.name)
            backend = providers.build(name, spec)
            deployment = Deployment(
                name,
                backend,
                described.upstream_model,
                spec.weight,
                described.stream_usage,
                max_concurrency=described.max_concurrency,
            )
            if len(model.deployments) > 1:
                deployment.health = DeploymentHealth(
                    health, pool, clock, _ejected(metrics, model.name, name)
                )
            deployments.append(deployment)
        table.append(
            ModelRoute(
                model.name,
                deployments,
                fallbacks=tuple(model.fallbacks),
                context_window_fallbacks=tuple(model.context_window_fallbacks),
                content_policy_fallbacks=tuple(model.content_policy_fallbacks),
                balancer=(
                    Balancer(deployments, POLICIES[model.balancing](), clock)
                    if len(deployments) > 1
                    else None
                ),
            )
        )
    return table


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
