"""The model table built from settings: each public model's deployments and fallbacks."""

from __future__ import annotations

from sluice.backends.registry import ProviderRegistry
from sluice.routing.capacity import LoadShedding
from sluice.routing.deployment import Deployment
from sluice.routing.plan import ModelRoute
from sluice.settings import Settings


def build_table(
    settings: Settings, providers: ProviderRegistry, shedding: LoadShedding | None = None
) -> list[ModelRoute]:
    """``shedding`` gives each deployment its concurrency cap and queue (none without it)."""
    table = []
    for model in settings.models:
        deployments = []
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            described = providers.describe(spec, model.name)
            backend = providers.build(name, spec)
            capacity = None
            if shedding is not None:
                capacity = shedding.capacity(model.name, name, described.max_concurrency)
            deployments.append(
                Deployment(
                    name,
                    backend,
                    described.upstream_model,
                    spec.weight,
                    described.stream_usage,
                    capacity=capacity,
                )
            )
        table.append(
            ModelRoute(
                model.name,
                deployments,
                fallbacks=tuple(model.fallbacks),
                context_window_fallbacks=tuple(model.context_window_fallbacks),
                content_policy_fallbacks=tuple(model.content_policy_fallbacks),
            )
        )
    return table
