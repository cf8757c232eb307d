"""A streamed answer as it leaves the pipeline (a complete one is a `UpstreamReply`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass(slots=True)
class StreamReply:
    events: AsyncIterator[bytes]
    """Complete server-sent events, relayed as they arrive (`sluice.pipeline.sse`)."""
    close: Callable[[], Awaitable[None]]
    """Aborts the upstream request if it still runs; safe to call more than once."""
