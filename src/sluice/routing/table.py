"""The model table built from settings: each public model's deployments and fallbacks."""

from __future__ import annotations

from sluice.backends.registry import ProviderRegistry
from sluice.routing.deployment import Deployment
from sluice.routing.plan import ModelRoute
from sluice.settings import Settings


def build_table(settings: Settings, providers: ProviderRegistry) -> list[ModelRoute]:
    table = []
    for model in settings.models:
        deployments = []
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            described = providers.describe(spec, model.name)
            backend = providers.build(name, spec)
            deployments.append(
                Deployment(
                    name, backend, described.upstream_model, spec.weight, described.stream_usage
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
