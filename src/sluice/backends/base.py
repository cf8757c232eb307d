"""The contract every backend honours, and the request/reply shapes that cross it.

A backend speaks OpenAI's wire format in both directions: it receives the (possibly
rewritten) request body and returns the upstream's bytes untouched, so the gateway never
re-serialises a body it does not need to change. Failures are raised as
`sluice.errors.UpstreamError` subclasses, translated at the backend's boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Route = Literal["chat/completions", "completions", "embeddings"]


@dataclass(slots=True)
class UpstreamCall:
    """One request, as a backend receives it."""

    route: Route
    body: dict[str, Any]
    """The parsed request, with ``model`` already set to the deployment's own model name."""
    raw: bytes | None
    """The client's bytes when they can be sent unchanged; None when ``body`` was rewritten."""
    request_id: str
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers for the upstream (never the client's credentials)."""
    priority: int = 0
    """Queue order in the embedded engine (higher first), from the caller's key; 0 for
    everyone without one. Never read from the request body."""
    strip_usage: bool = False
    """The gateway asked for a stream's usage chunk that the client did not: the relay
    reads it and removes it."""


@dataclass(slots=True)
class UpstreamReply:
    """A complete (non-streaming) successful answer."""

    status: int
    body: bytes
    content_type: str = "application/json"


class Backend(Protocol):
    """A place that serves OpenAI-shaped requests."""

    name: str

    async def start(self) -> None:
        """Open pools, load models. Called once in the app's lifespan."""

    async def close(self) -> None:
        """Release everything `start` opened."""

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        """Serve a non-streaming call; raise an `UpstreamError` subclass on failure."""

    def stream(self, call: UpstreamCall) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Serve a streaming call.

        Entering the context sends the request and waits for the upstream to accept it
        (errors before the first byte raise here, so the client still gets a proper status);
        iterating yields raw ``text/event-stream`` bytes as they arrive (raising an
        `UpstreamError` if the upstream fails mid-stream); leaving the context, including by
        cancellation, aborts the upstream request at once.
        """
