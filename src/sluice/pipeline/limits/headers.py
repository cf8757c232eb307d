"""OpenAI's ``x-ratelimit-*`` response headers for a limiter's admission."""

from __future__ import annotations

from sluice.pipeline.limits import Admission

_REQUEST_LINES = (
    b"x-ratelimit-limit-requests: %d\r\n"
    b"x-ratelimit-remaining-requests: %d\r\n"
    b"x-ratelimit-reset-requests: %.3fs\r\n"
)
_TOKEN_LINES = (
    b"x-ratelimit-limit-tokens: %d\r\n"
    b"x-ratelimit-remaining-tokens: %d\r\n"
    b"x-ratelimit-reset-tokens: %.3fs\r\n"
)
_BOTH_LINES = _REQUEST_LINES + _TOKEN_LINES


def ratelimit_header_block(admission: Admission) -> bytes:
    """OpenAI's x-ratelimit-* headers for ``admission`` as HTTP header lines, for servers
    with the ``sluice.header_block`` extension (`sluice.http_protocol`): one formatting
    operation, as it runs for every response of a limited key."""
    a = admission
    if a.limit_requests is not None:
        if a.limit_tokens is not None:
            return _BOTH_LINES % (
                a.limit_requests,
                a.remaining_requests or 0,
                a.reset_requests or 0,
                a.limit_tokens,
                a.remaining_tokens or 0,
                a.reset_tokens or 0,
            )
        return _REQUEST_LINES % (
            a.limit_requests,
            a.remaining_requests or 0,
            a.reset_requests or 0,
        )
    if a.limit_tokens is not None:
        return _TOKEN_LINES % (a.limit_tokens, a.remaining_tokens or 0, a.reset_tokens or 0)
    return b""
