"""Providers: how each kind of deployment setting becomes a backend.

The registry maps a deployment's ``provider`` (the settings' discriminator) to the object
that builds its backend and describes it; nothing else in Sluice branches on the kind of
a deployment. Local providers import their optional extras only when used, so a gateway
without llama.cpp or torch installed can still relay to HTTP upstreams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from sluice.backends.base import Backend
from sluice.settings import (
    ConfigError,
    DeploymentSettings,
    LocalDeployment,
    LocalEmbeddingDeployment,
    OpenAIDeployment,
    resolve_secret,
)

if TYPE_CHECKING:
    from sluice.engine.types import SequenceTracer


@dataclass(frozen=True, slots=True)
class Description:
    target: str
    """Where it sends requests: a URL or a model file."""
    upstream_model: str
    """The model name the backend knows."""
    stream_usage: bool
    """Whether the gateway asks it for a usage chunk on streams."""
    max_concurrency: int | None = None
    """Requests the gateway lets run on it at once (`sluice.routing.capacity`); None for a
    backend that queues and refuses for itself."""


class Provider(Protocol):
    def build(self, name: str, spec: Any) -> Backend:
        """The backend for one deployment (started later, in the app's lifespan)."""

    def describe(self, spec: Any, public_model: str) -> Description: ...

    def secrets(self, spec: Any) -> list[str | None]:
        """Secret references the deployment needs at start-up (checked by check-config)."""


class ProviderRegistry:
    def __init__(self) -> None:
        self._providers: dict[str, Provider] = {}

    def register(self, provider: str, implementation: Provider) -> None:
        self._providers[provider] = implementation

    def __getitem__(self, provider: str) -> Provider:
        try:
            return self._providers[provider]
        except KeyError:
            raise ConfigError(f"no backend is registered for provider {provider!r}") from None

    def build(self, name: str, spec: DeploymentSettings) -> Backend:
        return self[spec.provider].build(name, spec)

    def describe(self, spec: DeploymentSettings, public_model: str) -> Description:
        return self[spec.provider].describe(spec, public_model)


class OpenAIProvider:
    def build(self, name: str, spec: OpenAIDeployment) -> Backend:
        from sluice.backends.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(name, spec, resolve_secret(spec.api_key))

    def describe(self, spec: OpenAIDeployment, public_model: str) -> Description:
        return Description(
            spec.api_base, spec.model or public_model, spec.stream_usage, spec.max_concurrency
        )

    def secrets(self, spec: OpenAIDeployment) -> list[str | None]:
        return [spec.api_key]


class LocalProvider:
    """The embedded llama.cpp engine; its metrics are shared by every local deployment."""

    def __init__(self, registry: CollectorRegistry, tracer: SequenceTracer | None = None) -> None:
        self._registry = registry
        self._tracer = tracer
        self._metrics: object | None = None

    def build(self, name: str, spec: LocalDeployment) -> Backend:
        try:
            from sluice.backends.local import LocalBackend
            from sluice.backends.local_params import RequestDefaults
            from sluice.engine.config import EngineConfig
            from sluice.engine.metrics import EngineMetrics
        except ImportError as exc:  # the optional extra is missing
            raise ConfigError(
                f"deployment {name} uses provider 'local', which needs the local extra: "
                f"pip install 'sluice-gateway[local]' ({exc})"
            ) from exc
        if self._metrics is None:
            self._metrics = EngineMetrics(self._registry)
        config = EngineConfig(
            model_path=spec.model_path,
            n_ctx=spec.context_size,
            parallel=spec.parallel,
            threads=spec.threads,
            batch_size=spec.batch_size,
            step_tokens=spec.step_tokens,
            max_queue=spec.max_queue,
            max_queue_wait_s=spec.max_queue_wait,
            cache_prompt=spec.cache_prompt,
            max_sequences_per_request=spec.max_sequences_per_request,
        )
        defaults = RequestDefaults(**spec.defaults.model_dump())
        backend: Backend = LocalBackend(name, config, self._metrics, self._tracer, defaults)  # type: ignore[arg-type]
        return backend

    def describe(self, spec: LocalDeployment, public_model: str) -> Description:
        return Description(spec.model_path or "(packaged SmolLM2 GGUF)", public_model, False)

    def secrets(self, spec: LocalDeployment) -> list[str | None]:
        return []


class LocalEmbeddingProvider:
    def build(self, name: str, spec: LocalEmbeddingDeployment) -> Backend:
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

    def describe(self, spec: LocalEmbeddingDeployment, public_model: str) -> Description:
        target = spec.model_path or "(packaged all-MiniLM-L6-v2)"
        return Description(target, public_model, False)

    def secrets(self, spec: LocalEmbeddingDeployment) -> list[str | None]:
        return []


def default_providers(
    registry: CollectorRegistry, engine_tracer: SequenceTracer | None = None
) -> ProviderRegistry:
    """Every provider Sluice ships, keyed by the ``provider`` value of its settings;
    ``engine_tracer`` (when tracing is on) traces the embedded engine's sequences."""
    providers = ProviderRegistry()
    providers.register("openai", OpenAIProvider())
    providers.register("local", LocalProvider(registry, engine_tracer))
    providers.register("local-embedding", LocalEmbeddingProvider())
    return providers
