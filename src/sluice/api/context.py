"""What one request carries through the gateway, for metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass

SCOPE_KEY = "sluice.request"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float
    route: str = "other"
    model: str | None = None
    deployment: str | None = None
    stream: bool = False
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_kind: str | None = None
    client_disconnected: bool = False
