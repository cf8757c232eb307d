"""Rolling-window arithmetic shared by the memory and Redis limiters.

Usage is counted in one-second buckets (bucket ``s`` holds everything that happened in
``[s, s + 1)``). A bucket stays in the window for ``WINDOW_BUCKETS`` = 61 seconds after
it opened, i.e. the current second plus the 60 before it. That is one bucket more than
"the last 60 buckets" on purpose: every request is then counted for at least a full 60 s
after it happened, so *no* 60-second span can ever hold more than the limit (with 60
buckets, a burst at the end of second 0 and another at the start of second 60 would
both fit in one minute: up to twice the limit). The price is that a saturated key gets
``limit`` requests per 60 to 61 s instead of per 60 s (≤ 1.7 % less throughput).

The Lua script in ``lua.py`` implements the same rules; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sluice.pipeline.limits.base import Admission, Reason, Ticket

WINDOW_BUCKETS = 61
"""Seconds a bucket stays counted after it opened."""

new_tuple = tuple.__new__
"""``new_tuple(Admission, values)``: an admission without the named tuple's Python-level
constructor call."""

NEVER_RETRY_AFTER = 60.0
"""retry_after when the request alone exceeds a limit (it can never pass)."""

PARALLEL_RETRY_AFTER = 1.0
"""retry_after when every parallel slot is taken."""


def first_live_second(now: float) -> int:
    """Oldest bucket second still inside the window at ``now``."""
    return int(now) - WINDOW_BUCKETS + 1


def seconds_until_freed(buckets: Iterable[tuple[int, int]], need: int, now: float) -> float:
    """Time until the oldest ``buckets`` (ascending seconds) holding ``need`` units leave.

    ``need`` is how much usage must drop for the request to fit; the answer lies in
    ``(0, WINDOW_BUCKETS]`` for a live window.
    """
    freed = 0
    for second, amount in buckets:
        freed += amount
        if freed >= need:
            return max(second + WINDOW_BUCKETS - now, 0.001)
    return float(WINDOW_BUCKETS)


Usage = tuple[int, int, int | None]
"""One scope's limit, its usage after the decision and its oldest counted bucket second
(None when nothing is counted), for the rate-limit headers. A plain tuple: one is made per
limited scope and request, and a named tuple's constructor is a Python call."""


def _tightest(usages: Sequence[Usage]) -> Usage | None:
    """The usage with the least remaining (then the smallest limit)."""
    if len(usages) == 1:
        return usages[0]
    best: Usage | None = None
    for usage in usages:
        if best is None or (usage[0] - usage[1], usage[0]) < (best[0] - best[1], best[0]):
            best = usage
    return best


_NO_LIMIT: tuple[None, None, None] = (None, None, None)


def _header_values(
    usage: Usage | None, now: float
) -> tuple[int, int, float] | tuple[None, None, None]:
    """Limit, remaining and seconds to reset of one usage, for the x-ratelimit headers."""
    if usage is None:
        return _NO_LIMIT
    limit, used, oldest = usage
    reset = 0.0 if oldest is None else max(oldest + WINDOW_BUCKETS - now, 0.0)
    return limit, max(limit - used, 0), reset


def build_admission(
    allowed: bool,
    reason: Reason | None,
    retry_after: float,
    requests: Sequence[Usage],
    tokens: Sequence[Usage],
    now: float,
    ticket: Ticket | None,
) -> Admission:
    """The admission for a decision at ``now``; header fields from the tightest usages."""
    # Runs once per request (the Redis limiter's every admission, any refusal): positional
    # arguments, and the named tuple made by tuple.__new__, as its own constructor is a
    # Python-level call (3.6k against 1.6k instructions).
    limit_requests, remaining_requests, reset_requests = _header_values(_tightest(requests), now)
    limit_tokens, remaining_tokens, reset_tokens = _header_values(_tightest(tokens), now)
    return new_tuple(
        Admission,
        (
            allowed,
            reason,
            0.0 if allowed else retry_after,
            limit_requests,
            remaining_requests,
            reset_requests,
            limit_tokens,
            remaining_tokens,
            reset_tokens,
            ticket if allowed else None,
        ),
    )
