"""What one request carries through the gateway, for metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sluice.pipeline.auth import Principal
    from sluice.pipeline.budgets import BudgetHold
    from sluice.pipeline.limits import Admission, Ticket

SCOPE_KEY = "sluice.request"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    """Made by the server (random): keys the usage record and the limiter's slot."""
    started: float
    route: str = "other"
    client_request_id: str | None = None
    """The client's ``X-Request-ID``: for correlation only."""
    model: str | None = None
    deployment: str | None = None
    stream: bool = False
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_kind: str | None = None
    client_disconnected: bool = False
    content_events: int = 0
    """Stream events relayed, the completion's size when the upstream reports no usage."""
    prompt_estimate: int = 0
    body_bytes: int = 0
    """The request body's size: the bound on its prompt tokens (`sluice.pipeline.costs`),
    at which the prompt is counted when the upstream reports no usage."""
    created_us: int = 0
    """When the request was made (µs since the epoch, UTC): its usage record's time, hence
    the budget period it is charged to (the budget step sets it at admission)."""
    principal: Principal | None = None
    admission: Admission | None = None
    ticket: Ticket | None = None
    budget_hold: BudgetHold | None = None
    accepted: bool = False
    """Passed authentication and admission and went to a backend: gets a usage record."""
