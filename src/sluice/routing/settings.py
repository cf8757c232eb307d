"""Settings of routing and resilience: balancing, outlier ejection, retries, fallbacks,
load shedding and model versions (read by `sluice.settings`; see docs/resilience.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110's token)."""

Balancing = Literal["weighted", "least_outstanding", "latency"]


class RetrySettings(_Strict):
    """Retries only where safe: before the first response byte (docs/resilience.md)."""

    attempts: int = Field(3, ge=1, le=10, description="upstream calls per client request, at most")
    backoff_initial: float = Field(
        0.025, ge=0, description="seconds; the n-th retry waits a random time up to initial * 2^n"
    )
    backoff_max: float = Field(1.0, ge=0, description="seconds; the cap of one backoff")
    deadline: float = Field(
        30.0, gt=0, description="seconds from the first attempt after which no retry starts"
    )
    budget_ratio: float = Field(
        0.2, ge=0, le=1, description="retries per deployment as a share of its requests"
    )
    budget_min_per_second: float = Field(
        5.0, ge=0, description="retries a deployment may always have per second (the floor)"
    )


class HealthSettings(_Strict):
    """Passive outlier detection per deployment, and optional active probes."""

    consecutive_failures: int = Field(5, ge=1, description="failures in a row that eject")
    window: float = Field(10.0, gt=0, description="seconds over which rates are measured")
    min_requests: int = Field(10, ge=1, description="requests in the window before rates count")
    error_rate: float = Field(0.5, gt=0, le=1, description="failure share that ejects")
    slow_call_seconds: float = Field(
        30.0, gt=0, description="a first byte later than this counts as a slow call"
    )
    slow_rate: float = Field(0.8, gt=0, le=1, description="slow-call share that ejects")
    ejection_base: float = Field(
        5.0, gt=0, description="seconds of the first ejection; each repeat doubles it"
    )
    ejection_max: float = Field(300.0, gt=0, description="seconds; the longest ejection")
    max_ejected_percent: float = Field(
        50.0, ge=0, le=100, description="share of a model's deployments ejected at once"
    )
    half_open_probes: int = Field(
        1, ge=1, description="requests let through at once to a deployment whose ejection ended"
    )
    probe_interval: float | None = Field(
        None, gt=0, description="seconds between active probes (GET /models); off by default"
    )


class QueueSettings(_Strict):
    """Load shedding: bounded waiting, refused at once past the bounds."""

    max_waiting: int = Field(
        1024, ge=0, description="requests waiting for any deployment, per process"
    )
    deployment_max_waiting: int = Field(
        256, ge=0, description="requests waiting for one deployment's concurrency cap"
    )
    max_wait: float = Field(10.0, gt=0, description="seconds a request may wait before 503")
    reserved_share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of each queue and concurrency cap kept for keys with priority > 0",
    )


class ResilienceSettings(_Strict):
    retries: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    queue: QueueSettings = QueueSettings()


class VersionSettings(_Strict):
    model: str = Field(min_length=1, description="a model defined under models")
    weight: float = Field(
        ge=0, allow_inf_nan=False, description="share of the alias's traffic (relative)"
    )


class StickySettings(_Strict):
    """Keep one user or session on one version while the weights stand."""

    by: Literal["user", "header"] = Field(
        "user", description="hash the request's `user` field, or a request header"
    )
    header: str | None = Field(None, description="the header, when by is header")

    @model_validator(mode="after")
    def _header_named(self) -> StickySettings:
        if self.by == "header" and not self.header:
            raise ValueError("sticky.header is required when sticky.by is header")
        if self.header is not None and not _HEADER_NAME.fullmatch(self.header):
            raise ValueError(f"sticky.header {self.header!r} is not an HTTP header name")
        return self


class ShadowSettings(_Strict):
    model: str = Field(min_length=1, description="a model defined under models")
    percent: float = Field(gt=0, le=100, description="share of requests mirrored to it")


class AliasSettings(_Strict):
    """A public name that splits its traffic across versions (canary), optionally sticky,
    optionally mirrored to a shadow model."""

    name: str = Field(min_length=1, description="the model name clients send")
    versions: list[VersionSettings] = Field(min_length=1)
    sticky: StickySettings | None = None
    shadow: ShadowSettings | None = None

    @model_validator(mode="after")
    def _some_weight(self) -> AliasSettings:
        check_weights(self.name, [version.weight for version in self.versions])
        models = [version.model for version in self.versions]
        if len(set(models)) != len(models):
            raise ValueError(f"alias {self.name!r}: a model is listed twice among its versions")
        return self


def check_weights(alias: str, weights: Sequence[float]) -> None:
    """Raise ValueError unless ``weights`` can split traffic: finite, >= 0, one > 0, and a
    finite total (each version's share is drawn against the running total)."""
    for weight in weights:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"alias {alias!r}: weights must be finite numbers >= 0")
    if not math.isfinite(sum(weights)):
        raise ValueError(f"alias {alias!r}: the weights' total must be finite; scale them down")
    if not any(weight > 0 for weight in weights):
        raise ValueError(f"alias {alias!r}: at least one version needs a weight > 0")
