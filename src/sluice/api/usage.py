"""Reading token usage from a complete upstream body without parsing all of it."""

from __future__ import annotations

import re

from sluice.api.context import RequestContext

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def read_body_usage(body: bytes, ctx: RequestContext) -> None:
    """Fill ``ctx``'s token counts from the ``usage`` object of an OpenAI response body.

    ``usage`` sits at the end of OpenAI-shaped bodies, so only the tail after its key is
    scanned: large embedding bodies are never decoded just to count tokens.
    """
    start = body.rfind(b'"usage"')
    if start < 0:
        return
    tail = body[start:]
    if match := _PROMPT.search(tail):
        ctx.prompt_tokens = int(match.group(1))
    if match := _COMPLETION.search(tail):
        ctx.completion_tokens = int(match.group(1))
    elif ctx.prompt_tokens is not None:
        ctx.completion_tokens = 0  # embeddings report prompt tokens only
