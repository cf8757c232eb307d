"""The ``tracing:`` section: OpenTelemetry spans exported over OTLP/HTTP, off by default.

Only settings live here, so that loading a configuration never needs the ``tracing``
extra; `sluice.observability.tracing` (which does) is imported only when ``enabled``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TracingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False, description="trace requests (needs the extra: pip install 'sluice[tracing]')"
    )
    service_name: str = Field("sluice", min_length=1, description="the spans' service.name")
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="OTLP over HTTP (protobuf): the collector's /v1/traces URL",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces kept; a client's traceparent decides for its own",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="sent with each export (a collector's token): each value inline or a "
        "secret reference, os.environ/NAME or file:/path",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("otlp_endpoint is an http(s):// URL (OTLP over HTTP)")
        return value
