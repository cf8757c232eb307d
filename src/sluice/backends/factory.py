"""Builds each configured deployment's backend; the only place that knows every provider."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sluice.backends.base import Backend
from sluice.backends.openai_http import OpenAIHTTPBackend
from sluice.routing.router import Deployment
from sluice.settings import (
    ConfigError,
    LocalDeployment,
    LocalEmbeddingDeployment,
    ModelSettings,
    OpenAIDeployment,
    Settings,
    resolve_secret,
)


class BackendFactory:
    """Turns deployment settings into started-later backends, sharing what must be shared."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._engine_metrics: object | None = None

    def deployments(self, settings: Settings) -> list[tuple[str, list[Deployment]]]:
        return [(model.name, self._model_deployments(model)) for model in settings.models]

    def _model_deployments(self, model: ModelSettings) -> list[Deployment]:
        out: list[Deployment] = []
        for index, spec in enumerate(model.deployments):
            name = spec.id or f"{model.name}/{index}"
            if isinstance(spec, OpenAIDeployment):
                backend: Backend = OpenAIHTTPBackend(name, spec, resolve_secret(spec.api_key))
                out.append(
                    Deployment(
                        name, backend, spec.model or model.name, spec.weight, spec.stream_usage
                    )
                )
            elif isinstance(spec, LocalDeployment):
                out.append(Deployment(name, self._local(name, spec), model.name, spec.weight))
            else:
                backend = self._local_embedding(name, spec)
                out.append(Deployment(name, backend, model.name, spec.weight))
        return out

    def _local_embedding(self, name: str, spec: LocalEmbeddingDeployment) -> Backend:
        try:
            from sluice.backends.local_embedding import LocalEmbeddingBackend
        except ImportError as exc:  # the optional extra is missing
            raise ConfigError(
                f"deployment {name} uses provider 'local-embedding', which needs the embeddings "
                f"extra: pip install 'sluice-gateway[embeddings]' ({exc})"
            ) from exc
        return LocalEmbeddingBackend(
            name,
            model_path=spec.model_path,
            max_batch_size=spec.max_batch_size,
            max_wait_s=spec.max_wait_ms / 1000,
            threads=spec.threads,
        )

    def _local(self, name: str, spec: LocalDeployment) -> Backend:
        try:
            from sluice.backends.local import LocalBackend
            from sluice.engine.config import EngineConfig
            from sluice.engine.metrics import EngineMetrics
        except ImportError as exc:  # the optional extra is missing
            raise ConfigError(
                f"deployment {name} uses provider 'local', which needs the local extra: "
                f"pip install 'sluice-gateway[local]' ({exc})"
            ) from exc
        if self._engine_metrics is None:
            self._engine_metrics = EngineMetrics(self._registry)
        config = EngineConfig(
            model_path=spec.model_path,
            n_ctx=spec.context_size,
            parallel=spec.parallel,
            threads=spec.threads,
            batch_size=spec.batch_size,
            max_queue=spec.max_queue,
            max_queue_wait_s=spec.max_queue_wait,
            cache_prompt=spec.cache_prompt,
            max_sequences_per_request=spec.max_sequences_per_request,
        )
        backend: Backend = LocalBackend(name, config, self._engine_metrics)  # type: ignore[arg-type]
        return backend
