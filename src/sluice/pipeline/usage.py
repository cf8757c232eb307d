"""Reading token usage from a complete upstream body without parsing all of it.

Counts come from the upstream and go to the database and to budgets, so only plausible
ones are taken: a non-negative integer below `MAX_REPORTED_TOKENS`. Anything else
(negative, fractional, a string, a thousand digits) counts as unreported, and the request
is charged from the gateway's own estimate, as when an upstream reports no usage.
"""

from __future__ import annotations

import re

from sluice.pipeline.context import RequestContext

MAX_REPORTED_TOKENS = 100_000_000
"""Above any real request (the largest contexts hold about 10 M tokens) and far below
the database's 32-bit columns."""

# A count is taken only when the number ends where JSON's integer would: no sign, no
# fraction, no exponent, at most nine digits (longer is above the cap anyway).
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(-?[\d.eE+\-]+|"|\w+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(-?[\d.eE+\-]+|"|\w+)')


def plausible_tokens(value: object) -> int | None:
    """``value`` as a token count, or None when no sane upstream would report it."""
    if type(value) is int and 0 <= value < MAX_REPORTED_TOKENS:
        return value
    return None


def _count(match: re.Match[bytes]) -> int | None:
    text = match.group(1)
    if text.isdigit() and len(text) <= 9:
        return plausible_tokens(int(text))
    return None


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
        ctx.prompt_tokens = _count(match)
    if match := _COMPLETION.search(tail):
        ctx.completion_tokens = _count(match)
    elif ctx.prompt_tokens is not None:
        ctx.completion_tokens = 0  # embeddings report prompt tokens only
