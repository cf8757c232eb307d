"""A deployment as the router sees it: one backend serving a public model, and the rewrite
that turns a client's request into that backend's call."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice.backends.base import Backend, Route, UpstreamCall
from sluice.protocol import wants_usage
from sluice.routing.capacity import Capacity

if TYPE_CHECKING:
    from sluice.routing.health import DeploymentHealth


class Outcome(enum.Enum):
    """How one attempt at a deployment ended, as health and balancing see it."""

    OK = "ok"
    FAILED = "failed"
    """A connect error, reset, timeout or 5xx: counts against the deployment's health."""
    THROTTLED = "throttled"
    """A 429: back-pressure, not a health failure (the deployment cools for Retry-After)."""
    NO_VERDICT = "no_verdict"
    """Says nothing of the deployment: no call was made (it was busy), the client left,
    or the gateway itself failed. Frees the attempt's place and judges nothing."""


@dataclass(slots=True)
class Deployment:
    id: str
    backend: Backend
    upstream_model: str
    """The model name the backend knows (the public name unless configured)."""
    weight: float
    stream_usage: bool = False
    """Ask the upstream for a usage chunk on streams (stripped unless the client asked)."""
    max_concurrency: int | None = None
    """Attempts it takes at once (None: no cap of its own, e.g. a local engine's queue);
    one at its cap goes to the back of a plan."""
    health: DeploymentHealth | None = None
    """Outlier detection and latency; None when its model has no other deployment (there
    is nothing to balance or eject, so nothing is measured)."""
    outstanding: int = 0
    """Attempts under way in this process."""
    capacity: Capacity | None = None  # its concurrency cap and queue (None: uncapped here)

    def begin(self) -> None:
        """An attempt starts (the attempts step calls this, then `end` exactly once)."""
        self.outstanding += 1
        if self.health is not None:
            self.health.begin()

    def end(
        self, outcome: Outcome, first_byte_s: float | None, retry_after_s: float | None = None
    ) -> None:
        """The attempt ended: ``first_byte_s`` is the time to its first response byte (None
        when none came), ``retry_after_s`` an upstream 429's Retry-After."""
        self.outstanding -= 1
        if self.health is not None:
            self.health.end(outcome, first_byte_s, retry_after_s)

    def call(
        self,
        route: Route,
        model: str,
        body: dict[str, Any],
        raw: bytes | None,
        request_id: str,
        stream: bool,
    ) -> UpstreamCall:
        """The backend's call for a request to public ``model``: ``body`` is never changed
        (another attempt may go to a deployment with other names), only copied when the
        call needs other fields; ``raw`` is forwarded only when nothing changed."""
        if self.upstream_model != model:
            body = {**body, "model": self.upstream_model}
            raw = None
        strip_usage = False
        if stream and self.stream_usage and not wants_usage(body):
            options = body.get("stream_options")
            body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
            raw, strip_usage = None, True
        return UpstreamCall(route, body, raw, request_id, stream, strip_usage=strip_usage)
