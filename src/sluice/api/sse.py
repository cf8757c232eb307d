"""Relaying an upstream's server-sent events: frame, count usage, never buffer a whole stream.

Upstream bytes are cut into complete events (``\\n\\n``-terminated) and each batch of complete
events is forwarded the moment it arrives; only an unfinished event's tail waits for its
next bytes. Usage chunks are read for accounting and, when the gateway itself asked the
upstream for usage, removed before the client sees them. A stream that ends without
``[DONE]`` is an upstream failure, reported to the client as an SSE error event.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import orjson

from sluice.api.context import RequestContext
from sluice.errors import SluiceError, UpstreamConnectError

DONE = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def error_event(error: SluiceError) -> bytes:
    """The SSE events that end a stream which failed after its first byte."""
    return b"data: " + error.body() + b"\n\n" + DONE


async def relay_events(
    chunks: AsyncIterator[bytes], ctx: RequestContext, *, strip_usage: bool
) -> AsyncIterator[bytes]:
    """Yield complete SSE events from ``chunks`` as soon as they are complete."""
    pending = b""
    finished = False
    async for chunk in chunks:
        pending += chunk
        if b"\n\n" not in pending and b"\r\n\r\n" not in pending:
            continue
        *events, pending = _EVENT_END.split(pending)
        out: list[bytes] = []
        for event in events:
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
        if out:
            if ctx.ttft_seconds is None:
                ctx.ttft_seconds = time.perf_counter() - ctx.started
            yield b"".join(out)
    if not finished:
        raise UpstreamConnectError(
            "The upstream closed the stream before it finished.", code="upstream_stream_incomplete"
        )


def _read_usage(event: bytes, ctx: RequestContext) -> bool:
    """Record the usage in ``event``; True when the event carries nothing but usage."""
    data = b"".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    if not isinstance(usage, dict):
        return False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int):
        ctx.prompt_tokens = prompt
    if isinstance(completion, int):
        ctx.completion_tokens = completion
    return bool(chunk.get("choices") == [])
