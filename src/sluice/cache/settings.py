"""The cache's settings (``cache:`` in the configuration, ``cache:`` on a model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


COSINE_ALONE_THRESHOLD = 0.97
"""Where all-MiniLM-L6-v2's cosine alone keeps false hits at or under 1% (the same data)."""
DEFAULT_SEMANTIC_THRESHOLD = 0.82
"""Cosine similarity of the last user turns, with the second check (`sluice.cache.verify`);
chosen on the paraphrase pairs (docs/semantic-cache.md)."""


class SemanticSettings(_Strict):
    embedding_model: str | None = Field(
        None,
        description="the served model that embeds prompts (a local-embedding or remote "
        "embeddings model); required when any model or key turns the semantic cache on",
    )
    threshold: float = Field(
        DEFAULT_SEMANTIC_THRESHOLD,
        gt=0,
        le=1,
        description="cosine similarity a stored prompt needs to answer a new one",
    )
    verify: bool = Field(
        True, description="the second check on a candidate (numbers, names, negation)"
    )
    max_entries: int = Field(
        50_000, ge=1, description="prompts indexed per process (oldest dropped first)"
    )

    @model_validator(mode="after")
    def _cosine_alone_needs_a_high_threshold(self) -> SemanticSettings:
        if not self.verify and self.threshold < COSINE_ALONE_THRESHOLD:
            raise ValueError(
                f"cache.semantic.verify is false: cosine similarity alone serves over 1% "
                f"false hits below {COSINE_ALONE_THRESHOLD} (docs/semantic-cache.md); set "
                f"threshold to at least {COSINE_ALONE_THRESHOLD}, or keep the second check"
            )
        return self


class CacheSettings(_Strict):
    enabled: bool = Field(False, description="cache answers (models may override)")
    namespace: Literal["key", "team", "global"] = Field(
        "key",
        description="whose answers a request may be served: its own key's (default), its "
        "key's team's, or everyone's",
    )
    ttl: float = Field(3600.0, gt=0, description="seconds an answer is kept (models may override)")
    max_ttl: float = Field(
        86_400.0, gt=0, description="the longest a request's max-age may keep an answer"
    )
    memory_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="the in-process tier's budget (0: no memory tier)"
    )
    max_entry_bytes: int = Field(1024 * 1024, ge=1024, description="larger answers are not stored")
    redis: bool = Field(
        False, description="keep answers in Redis too (redis_url), shared by every replica"
    )
    deterministic_only: bool = Field(
        True,
        description="store only answers a request pins down (temperature 0, or a seed); "
        "others only when the request asks (max-age)",
    )
    store_errors: bool = Field(False, description="also store upstream 4xx answers (not 408/429)")
    store_truncated: bool = Field(
        False, description="also store answers cut by max_tokens (finish_reason length)"
    )
    store_tool_calls: bool = Field(False, description="also store answers that call tools")
    coalesce: bool = Field(
        True, description="identical requests in flight at once make one upstream call"
    )
    controls: bool = Field(
        True,
        description="honour the request's Cache-Control (no-cache, no-store, max-age) and "
        "body 'cache' field (a key may be denied them)",
    )
    semantic: SemanticSettings = SemanticSettings()


class ModelCacheSettings(_Strict):
    """A model's own cache settings; unset fields follow ``cache:``."""

    enabled: bool | None = None
    ttl: float | None = Field(None, gt=0)
    semantic: bool = Field(False, description="answer paraphrases of stored prompts (opt-in)")
