"""Typed settings: a YAML file, then ``SLUICE_*`` environment overrides, then CLI flags.

Nested keys are reached with a double underscore: ``SLUICE_SERVER__PORT=9000`` overrides
``server.port``. Provider secrets are never written inline: ``api_key`` holds a reference,
``os.environ/NAME`` (read from the environment) or ``file:/path`` (a mounted secret), and is
resolved only when the backend is built, so the resolved value never enters the settings
object, ``check-config`` output or any log.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sluice.batches.settings import BatchSettings, FilesSettings
from sluice.cache.settings import CacheSettings, ModelCacheSettings
from sluice.observability.tracing_settings import TracingSettings
from sluice.routing.settings import AliasSettings, Balancing, ResilienceSettings

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"
_ENV_REF = "os.environ/"
_FILE_REF = "file:"


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _reference(value: str | None) -> str | None:
    """Secrets are written as references, never inline."""
    if value is None or value.startswith((_ENV_REF, _FILE_REF)):
        return value
    raise ValueError(
        "inline secrets are not allowed: write os.environ/NAME or file:/path "
        "(omit the key where none is needed)"
    )


SecretRef = Annotated[str | None, AfterValidator(_reference)]


class TimeoutSettings(_Strict):
    connect: float = Field(5.0, gt=0, description="seconds to open the TCP/TLS connection")
    first_byte: float = Field(
        60.0, gt=0, description="seconds until response headers, and between stream chunks"
    )
    total: float = Field(600.0, gt=0, description="seconds for the whole request, streams included")


class EmbeddingBatchSettings(_Strict):
    """Merge concurrent embedding requests into one upstream call with an array input."""

    max_batch_size: int = Field(64, ge=1, description="inputs per upstream call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request may wait for others")


class OpenAIDeployment(_Strict):
    """Any OpenAI-compatible HTTP upstream: OpenAI, vLLM, TGI, llama.cpp server, Ollama."""

    provider: Literal["openai"]
    id: str | None = Field(None, description="label in metrics and logs (default: model/index)")
    api_base: str = Field(description="base URL including /v1, e.g. http://127.0.0.1:8000/v1")
    api_key: SecretRef = Field(None, description="os.environ/NAME or file:/path; never inline")
    model: str | None = Field(None, description="the upstream's model name (default: public name)")
    weight: float = Field(1.0, gt=0)
    timeout: TimeoutSettings = TimeoutSettings()
    max_concurrency: int = Field(
        256, ge=1, description="requests (and connections) to this upstream at once; more queue"
    )
    ca_file: str | None = Field(
        None, description="PEM bundle to verify an https upstream (default: system CAs)"
    )
    headers: dict[str, str] = Field(default_factory=dict, description="extra upstream headers")
    stream_usage: bool = Field(
        True, description="ask for usage on streams (stripped unless the client asked)"
    )
    batch_embeddings: EmbeddingBatchSettings | None = Field(
        None, description="opt-in: micro-batch concurrent /embeddings calls into one"
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest non-streaming body (decoded) before 502"
    )
    proxy: str | None = Field(
        None,
        description="http://host:port proxy, 'none' for direct, or os.environ/NAME "
        "(default: HTTPS_PROXY / HTTP_PROXY / NO_PROXY)",
    )

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None or value == "none" or value.startswith((_ENV_REF, _FILE_REF)):
            return value
        if not value.startswith("http://"):
            raise ValueError("must be an http:// proxy URL, 'none', or os.environ/NAME")
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("credentials in a proxy URL are secrets: write os.environ/NAME")
        return value


class LocalRequestDefaults(_Strict):
    """What a request to a local deployment gets for the fields it omits; a value the
    request gives always wins. Chosen by measurement (bench/answer_quality.py,
    docs/local-model.md): the model card's sampling, a plain system prompt in place of the
    chat template's own, and a completion cap far below the context."""

    temperature: float = Field(0.2, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(0.9, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(
        50,
        ge=0,
        le=2**31 - 1,
        description="sample among the k likeliest tokens only (0: all of them); 50 is what "
        "the model card's sampling ran with (Hugging Face's default), and it spares "
        "llama.cpp's top_p a sort of the whole vocabulary",
    )
    max_tokens: int | None = Field(
        512, ge=1, description="completion tokens; null: the rest of the context"
    )
    system_prompt: str | None = Field(
        "You are a helpful assistant. Answer briefly and accurately.",
        max_length=4096,
        description="put first in a chat with no system or developer message; "
        "null or empty: the chat template's own",
    )


class LocalDeployment(_Strict):
    """The in-process model, run by llama.cpp with continuous batching."""

    provider: Literal["local"]
    id: str | None = Field(None, description="label in metrics and logs (default: model/index)")
    model_path: str | None = Field(None, description="GGUF file; default: the packaged SmolLM2")
    context_size: int = Field(
        2048, ge=256, description="tokens of context per slot (KV cache: context * parallel)"
    )
    parallel: int = Field(8, ge=1, le=256, description="sequences decoded together")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    batch_size: int = Field(512, ge=16, description="tokens per llama_decode step (> parallel)")
    step_tokens: int | None = Field(
        None,
        ge=2,
        description="most tokens a decode step takes: one per decoding sequence first, then "
        "prompt chunks (default: adaptive, twice the decoding sequences, at least 16, and a "
        "prompt that fits in that joins whole)",
    )
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot before 429")
    max_queue_wait: float = Field(30.0, gt=0, description="seconds a request may wait for a slot")
    cache_prompt: bool = Field(
        True, description="reuse a free slot's KV cache for a prompt sharing its prefix"
    )
    max_sequences_per_request: int = Field(
        16, ge=1, le=1024, description="most sequences (prompts x n) one request may run"
    )
    defaults: LocalRequestDefaults = LocalRequestDefaults()
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _batch_fits_every_slot(self) -> LocalDeployment:
        if self.batch_size <= self.parallel:
            raise ValueError("batch_size must be larger than parallel (one token per slot)")
        if self.step_tokens is not None and not self.parallel < self.step_tokens <= self.batch_size:
            raise ValueError(
                "step_tokens must be larger than parallel (one token per slot) and at most "
                "batch_size"
            )
        # An explicit default that cannot fit is a mistake; the built-in one is cut to the
        # context a request has left (sluice.backends.local_params.build).
        max_tokens = self.defaults.max_tokens
        explicit = "max_tokens" in self.defaults.model_fields_set
        if explicit and max_tokens is not None and max_tokens >= self.context_size:
            raise ValueError(
                "defaults.max_tokens must be below context_size (the prompt needs room too)"
            )
        return self


class LocalEmbeddingDeployment(_Strict):
    """all-MiniLM-L6-v2 (or another sentence-transformers model) in-process, micro-batched."""

    provider: Literal["local-embedding"]
    id: str | None = Field(None, description="label in metrics and logs (default: model/index)")
    model_path: str | None = Field(
        None, description="sentence-transformers model directory; default: the packaged MiniLM"
    )
    max_batch_size: int = Field(64, ge=1, description="inputs encoded together")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request may wait for others")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    weight: float = Field(1.0, gt=0)


DeploymentSettings = Annotated[
    OpenAIDeployment | LocalDeployment | LocalEmbeddingDeployment, Field(discriminator="provider")
]


class PricingSettings(_Strict):
    """USD per million tokens, for usage records and budgets (the cost of a request is
    worked out by `sluice.pipeline.accounting`)."""

    prompt_per_million: float = Field(0.0, ge=0, allow_inf_nan=False)
    completion_per_million: float = Field(0.0, ge=0, allow_inf_nan=False)


class ModelSettings(_Strict):
    name: str = Field(min_length=1, description="the model name clients send")
    deployments: list[DeploymentSettings] = Field(min_length=1)
    pricing: PricingSettings = PricingSettings()
    balancing: Balancing = Field(
        "least_outstanding",
        description="how a deployment is chosen: weighted (random by weight), "
        "least_outstanding (power of two choices), latency (EWMA of time to first byte)",
    )
    fallbacks: list[str] = Field(
        default_factory=list, description="models tried in order once every deployment failed"
    )
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="models tried when the prompt exceeds the context"
    )
    content_policy_fallbacks: list[str] = Field(
        default_factory=list, description="models tried when the upstream refuses the content"
    )
    cache: ModelCacheSettings = Field(
        ModelCacheSettings(), description="this model's cache settings (docs/caching.md)"
    )


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    drain_delay: float = Field(
        0.0, ge=0, description="seconds between SIGTERM (readiness false) and closing the socket"
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight work may finish")
    # The edge: slow clients, connection count, which Host and content types are served,
    # and who sees the docs and metrics (docs/security/edge.md).
    header_timeout: float = Field(
        10.0, gt=0, description="seconds from connect (or a request's first byte) to its headers"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="seconds from a request's headers to the last byte of its body"
    )
    keep_alive_timeout: float = Field(
        15.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    write_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a response may wait for a client that stopped reading; then the "
        "connection is cut",
    )
    max_connections: int = Field(
        10_000, ge=1, description="open client connections per worker; more are refused (503)"
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header names served (any port); '*' for any. Default: the loopback "
        "names on a loopback bind, any on 0.0.0.0/::, else the bind address",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed cross-origin (CORS); none by default"
    )
    docs: Literal["auto", "master_key", "public", "off"] = Field(
        "auto",
        description="/docs and /openapi.json: auto = behind the master key when one is set, "
        "public on a loopback bind without one, else off",
    )
    max_admin_body_bytes: int = Field(64 * 1024, ge=1024, description="larger /admin bodies: 413")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or networks (CIDR) of the proxies in front: from them, the "
        "client's address is read from X-Forwarded-For (and the scheme from "
        "X-Forwarded-Proto); from anyone else those headers are ignored",
    )
    watch_config: float = Field(
        0.0,
        ge=0,
        description="seconds between looks at the configuration file; a change reloads it as "
        "SIGHUP would (for a Kubernetes ConfigMap); 0: off",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port instead of the main one"
    )
    metrics_host: str | None = Field(
        None, description="the metrics listener's interface (default: host)"
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        """Each entry as a network: uvicorn ignores, without a word, a network written with
        host bits set (``127.0.0.1/8``), which would trust no proxy at all."""
        networks = []
        for entry in value:
            try:
                networks.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an IP address or network (CIDR)"
                ) from None
        return networks


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


class AuthSettings(_Strict):
    master_key: SecretRef = Field(
        None, description="os.environ/NAME or file:/path; when set, every /v1 request needs a key"
    )
    key_cache_ttl: float = Field(5.0, ge=0, description="seconds a key lookup is cached")
    unknown_key_cache: int = Field(
        10_000, ge=0, description="unknown keys remembered, so that repeating one costs no lookup"
    )
    unknown_key_ttl: float = Field(60.0, ge=0, description="seconds an unknown key is remembered")
    failure_limit: int = Field(
        20,
        ge=0,
        description="failed authentications one client address may make per failure_window "
        "before it is answered 429 (0: no limit)",
    )
    failure_window: float = Field(10.0, gt=0, description="seconds; see failure_limit")
    failure_addresses: int = Field(
        10_000,
        ge=1,
        description="client addresses (IPv6: /64 networks) whose failures are counted at once; "
        "past it the oldest is forgotten",
    )


class LimitsSettings(_Strict):
    redis_failure: Literal["open", "closed"] = Field(
        "open", description="when Redis is unreachable: admit (open) or answer 503 (closed)"
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="completion tokens reserved when a request sets no max_tokens"
    )
    redis_lease_seconds: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="with Redis: a parallel slot's lease, renewed every third of it while its "
        "request runs; a slot nobody releases (a lost reply, a replica gone) frees after it",
    )


class UsageSettings(_Strict):
    enabled: bool = Field(True, description="write one usage record per request")
    batch_size: int = Field(500, ge=1)
    flush_interval: float = Field(0.5, gt=0, description="seconds between batched writes")
    max_buffered: int = Field(
        100_000,
        ge=1,
        description="records kept in memory while the database is down; older ones go to "
        "the spool file under data_dir and are written once it answers again",
    )

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> UsageSettings:
        if self.max_buffered < self.batch_size:
            raise ValueError("usage.max_buffered must be at least usage.batch_size")
        return self


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(base, "sluice")


class Settings(BaseSettings):
    """Everything Sluice reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    usage: UsageSettings = UsageSettings()
    data_dir: str = Field(default_factory=_default_data_dir, description="SQLite file, spool")
    database_url: str | None = Field(
        None,
        description="sqlite:///path, postgresql://… or a secret reference; default: SQLite "
        "under data_dir",
    )
    migrations: Literal["run", "require"] = Field(
        "run",
        description="run: bring the database schema to this release's at start-up (under a "
        "lock); require: never migrate, refuse to start while the schema is older "
        "(`sluice migrate` runs them, e.g. as a Kubernetes Job)",
    )
    redis_url: str | None = Field(
        None, description="redis://… or a secret reference: shared limits, key invalidation"
    )
    models: list[ModelSettings] = Field(
        default_factory=lambda: [
            ModelSettings(name=DEFAULT_LOCAL_MODEL, deployments=[LocalDeployment(provider="local")])
        ]
    )
    aliases: list[AliasSettings] = Field(
        default_factory=list, description="public names split across model versions (canary)"
    )
    resilience: ResilienceSettings = ResilienceSettings()
    cache: CacheSettings = CacheSettings()
    files: FilesSettings = FilesSettings()
    batches: BatchSettings = BatchSettings()
    tracing: TracingSettings = TracingSettings()

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        seen: set[str] = set()
        for name in [model.name for model in self.models] + [a.name for a in self.aliases]:
            if name in seen:
                raise ValueError(f"model name {name!r} is defined twice")
            seen.add(name)
        return self

    @model_validator(mode="after")
    def _references_are_models(self) -> Settings:
        models = {model.name for model in self.models}
        for model in self.models:
            for field in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
                for name in getattr(model, field):
                    if name not in models:
                        raise ValueError(f"model {model.name!r}: {field} names unknown {name!r}")
        for alias in self.aliases:
            named = [v.model for v in alias.versions]
            if alias.shadow is not None:
                named.append(alias.shadow.model)
            for name in named:
                if name not in models:
                    raise ValueError(f"alias {alias.name!r} names unknown model {name!r}")
        return self

    @model_validator(mode="after")
    def _cache_has_what_it_needs(self) -> Settings:
        cache = self.cache
        if cache.redis and self.redis_url is None:
            raise ValueError("cache.redis is true but redis_url is not set")
        embedding = cache.semantic.embedding_model
        semantic = [model.name for model in self.models if model.cache.semantic]
        if semantic and embedding is None:
            raise ValueError(
                f"model {semantic[0]!r} turns on the semantic cache, but "
                "cache.semantic.embedding_model names no embedding model"
            )
        if embedding is not None and embedding not in {model.name for model in self.models}:
            raise ValueError(f"cache.semantic.embedding_model names unknown model {embedding!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the environment overrides them.
        return env_settings, init_settings


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply the environment, then ``server`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    server_overrides = {k: v for k, v in overrides.items() if v is not None}
    if server_overrides:
        try:
            server = ServerSettings(**(settings.server.model_dump() | server_overrides))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, "command line")) from None
        settings = settings.model_copy(update={"server": server})
    refuse_unshared_limits(settings)
    return settings


def refuse_unshared_limits(settings: Settings) -> None:
    """Several workers without Redis would each keep their own limits (every key's rpm,
    tpm, parallel requests and budget multiplied by the worker count): refuse to start."""
    workers = settings.server.workers
    if workers > 1 and settings.redis_url is None and settings.auth.master_key is not None:
        raise ConfigError(
            f"server.workers is {workers} but redis_url is not set: each worker would keep "
            f"its own rate limits and budgets, letting every key use {workers} times its "
            "limits. Set redis_url to share limits across workers, or run workers: 1."
        )


def resolve_secret(reference: str | None) -> str | None:
    """Turn ``os.environ/NAME`` or ``file:/path`` into the secret; raise ConfigError if absent."""
    if reference is None:
        return None
    if reference.startswith(_ENV_REF):
        name = reference.removeprefix(_ENV_REF)
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"environment variable {name} (from {reference}) is not set")
        return value
    path = Path(reference.removeprefix(_FILE_REF))
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc


def resolve_url(value: str | None) -> str | None:
    """A URL may be written inline or as a secret reference (it can carry a password)."""
    if value is not None and value.startswith((_ENV_REF, _FILE_REF)):
        return resolve_secret(value)
    return value


def _describe(exc: ValidationError, source: str | os.PathLike[str] | None) -> str:
    where = f"{source}: " if source else ""
    lines = [f"{where}invalid configuration ({exc.error_count()} problem(s))"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {loc}: {error['msg']}")
    return "\n".join(lines)
