"""Relaying an upstream's server-sent events: frame, count usage, never buffer a whole stream.

Upstream bytes are cut into complete events (``\\n\\n``-terminated) and each batch of complete
events is forwarded the moment it arrives; only an unfinished event's tail waits for its
next bytes. Each chunk is scanned once: the search for the end of an event starts where
the previous search stopped (less the three bytes a split ``\\r\\n\\r\\n`` could hide), so a
long event arriving in many small chunks costs linear time, and an event may grow to
`MAX_EVENT_BYTES` before the stream is failed with an SSE error event. Usage chunks are
read for accounting and, when the gateway itself asked the upstream for usage, removed
before the client sees them. A stream that ends without ``[DONE]`` is an upstream
failure, reported to the client as an SSE error event.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from sluice.errors import SluiceError, UpstreamConnectError, UpstreamError
from sluice.pipeline.context import RequestContext
from sluice.pipeline.usage import plausible_tokens

DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1024 * 1024
"""An unfinished event larger than this fails the stream (OpenAI's events are a few KB)."""
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_LOOK_BACK = 3  # a delimiter is at most 4 bytes: this many may sit before a new chunk


def error_event(error: SluiceError) -> bytes:
    """The SSE events that end a stream which failed after its first byte."""
    return b"data: " + error.body() + b"\n\n" + DONE


async def relay_events(
    chunks: AsyncIterator[bytes],
    ctx: RequestContext,
    *,
    strip_usage: bool,
    max_event: int = MAX_EVENT_BYTES,
) -> AsyncIterator[bytes]:
    """Yield complete SSE events from ``chunks`` as soon as they are complete."""
    pending = bytearray()  # an unfinished event's bytes so far
    finished = False
    async for chunk in chunks:
        buf: bytes | bytearray
        if pending:
            scan_from = max(0, len(pending) - _LOOK_BACK)
            pending += chunk
            buf = pending
        else:  # the usual case: the chunk starts an event, and is read in place
            scan_from = 0
            buf = chunk
        out: list[bytes | bytearray] = []
        start = 0
        for end in _EVENT_END.finditer(buf, scan_from):
            event = buf[start : end.start()]
            start = end.end()
            if not event:
                continue
            if event.startswith((b"data: [DONE]", b"data:[DONE]")):
                finished = True
                out.append(DONE)
                continue
            if b'"usage"' in event and _read_usage(event, ctx) and strip_usage:
                continue
            out.append(event + b"\n\n")
            ctx.content_events += 1
        if buf is pending:
            del pending[:start]
        elif start < len(chunk):
            pending += chunk[start:]
        if len(pending) > max_event:
            raise UpstreamError(
                f"The upstream sent an event larger than {max_event} bytes.",
                code="upstream_event_too_large",
            )
        if out:
            if ctx.ttft_seconds is None:
                ctx.ttft_seconds = time.perf_counter() - ctx.started
            yield b"".join(out)
    if not finished:
        raise UpstreamConnectError(
            "The upstream closed the stream before it finished.", code="upstream_stream_incomplete"
        )


def event_data(event: bytes | bytearray) -> Any:
    """The JSON of one event's ``data:`` lines; None when it has none or is not JSON."""
    data = b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def usage_only(chunk: Any) -> bool:
    """Is this chunk the one that carries nothing but the stream's usage?"""
    return isinstance(chunk, dict) and chunk.get("choices") == [] and "usage" in chunk


def _read_usage(event: bytes | bytearray, ctx: RequestContext) -> bool:
    """Record the usage in ``event``; True when the event carries nothing but usage.

    Implausible counts (see `plausible_tokens`) are recorded as unknown.
    """
    chunk = event_data(event)
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    if not isinstance(usage, dict):
        return False
    if "prompt_tokens" in usage:
        ctx.prompt_tokens = plausible_tokens(usage["prompt_tokens"])
    if "completion_tokens" in usage:
        ctx.completion_tokens = plausible_tokens(usage["completion_tokens"])
    return usage_only(chunk)
