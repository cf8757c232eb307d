"""What one request carries through the pipeline: set by the steps, read by the ones after
them, by metrics and the access log, and by the usage record at the end."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.backends.base import Route
    from sluice.pipeline.auth import Principal
    from sluice.pipeline.budgets import BudgetHold
    from sluice.pipeline.limits import Admission, Ticket
    from sluice.routing.capacity import Capacity
    from sluice.routing.deployment import Deployment
    from sluice.routing.plan import Plan

SCOPE_KEY = "sluice.request"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    """Made by the server (random): keys the usage record and the limiter's slot."""
    started: float
    route: str = "other"
    client_request_id: str | None = None
    """The client's ``X-Request-ID``: for correlation only."""
    batch_id: str | None = None
    """The batch this request is a line of (`sluice.batches.runner`)."""

    # What the client sent (set by the HTTP layer before the pipeline runs).
    headers: list[tuple[bytes, bytes]] = ()  # type: ignore[assignment]
    query_string: bytes = b""
    client: tuple[str, int] | None = None
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]] | None = None
    """The ASGI ``receive`` the body is read from (`sluice.pipeline.request`)."""

    # The request, once read (`sluice.pipeline.request`).
    body: dict[str, Any] = None  # type: ignore[assignment]
    raw: bytes | None = None
    """The client's bytes while they can be forwarded unchanged; None once ``body`` was
    rewritten (the upstream then gets ``body`` serialised)."""
    upstream_route: Route | None = None
    model: str | None = None
    stream: bool = False
    plan: Plan | None = None

    # What happened upstream.
    target: Deployment | None = None
    """The deployment of the attempt under way (`sluice.pipeline.attempts`)."""
    deployment: str | None = None
    """Its id, for metrics, logs and the usage record."""
    upstream_started: float = 0.0
    slot: Capacity | None = None
    """The concurrency slot a complete answer's attempt holds, given back when it ends."""
    attempts: int = 0
    upstream_seconds: float = 0.0
    ttft_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_kind: str | None = None
    client_disconnected: bool = False
    content_events: int = 0
    """Stream events relayed, the completion's size when the upstream reports no usage."""
    trace_headers: dict[str, str] | None = None
    """``traceparent``/``tracestate`` for the attempt under way's upstream call, set by its
    span when tracing is on (`sluice.observability.tracing`)."""
    response_headers: bytes | None = None
    """Headers for the client's response, set by the attempts step (``x-sluice-*``); the
    list may be shared between requests: never changed in place."""

    cache: str | None = None
    """What the cache step did (hit, semantic-hit, coalesced, miss, bypass): the
    ``x-sluice-cache`` header; None where no cache runs."""
    cache_hit: bool = False
    """Answered without an upstream call of its own: costs nothing, counts no tokens
    against TPM, and its usage record says ``cache_hit``."""

    # Admission and what is charged.
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
    charged: tuple[int, int, float] | None = None
    """Prompt tokens, completion tokens and cost in USD, once worked out at the end."""
    at_end: list[Callable[[RequestContext], None]] | None = None
    """Run after the last byte (or the client's departure), before the usage record: a
    step whose work outlives its call (a stream's admission) settles here."""

    def then_at_end(self, finish: Callable[[RequestContext], None]) -> None:
        if self.at_end is None:
            self.at_end = [finish]
        else:
            self.at_end.append(finish)
