"""Rolling-window arithmetic shared by the memory and Redis limiters.

Usage is counted in one-second buckets (bucket ``s`` holds everything that happened in
``[s, s + 1)``). A bucket stays in the window for ``WINDOW_BUCKETS`` = 61 seconds after
it opened, i.e. the current second plus the 60 before it. That is one bucket more than
"the last 60 buckets" on purpose: every request is then counted for at least a full 60 s
after it happened, so *no* 60-second span can ever hold more than the limit (with 60
buckets, a burst at the end of second 0 and another at the start of second 60 would
both fit in one minute: up to twice the limit). The price is that a saturated key gets
``limit`` requests per 60 to 61 s instead of per 60 s (≤ 1.7 % less throughput).

The Lua script in ``lua.py`` implements the same rules; keep the two in step (the tests
in tests/pipeline/ run both on the same scenarios).
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


def build_admission(
    allowed: bool,
    reason: Reason | None,
    retry_after: float,
    requests: Sequence[Usage],
    tokens: Sequence[Usage],
    now: float,
    ticket: Ticket | None,
) -> Admission:
    """The admission for a decision at ``now``, with its ``x-ratelimit-*`` numbers chosen
    by the admission-header rule: for requests and for tokens alike, the tightest usage of
    the list (one per scope that has that limit): the least remaining, then the smallest
    limit, then the first of equals; remaining is at least 0, and reset is the time until
    that usage's oldest counted bucket leaves the window (0.0 when nothing is counted).

    This is the rule's one Python definition (the memory limiter's admissions and
    refusals); the Redis limiter's Lua script (``lua.py``, ``tightest``) applies the same
    rule inside Redis. tests/pipeline/test_limit_headers.py holds the three to the same
    scenarios."""
    # Runs for every admission of the memory limiter: written flat, since a Python-level
    # call (max() included) costs more than the arithmetic here, and the named tuple is
    # made by tuple.__new__, not its Python-level constructor.
    rpm_limit = rpm_left = rpm_reset = None
    for limit, used, oldest in requests:
        left = limit - used
        if (
            rpm_limit is None
            or rpm_left is None
            or left < rpm_left
            or (left == rpm_left and limit < rpm_limit)
        ):
            rpm_limit, rpm_left = limit, left
            rpm_reset = 0.0 if oldest is None else oldest + WINDOW_BUCKETS - now
    tpm_limit = tpm_left = tpm_reset = None
    for limit, used, oldest in tokens:
        left = limit - used
        if (
            tpm_limit is None
            or tpm_left is None
            or left < tpm_left
            or (left == tpm_left and limit < tpm_limit)
        ):
            tpm_limit, tpm_left = limit, left
            tpm_reset = 0.0 if oldest is None else oldest + WINDOW_BUCKETS - now
    return new_tuple(
        Admission,
        (
            allowed,
            reason,
            0.0 if allowed else retry_after,
            rpm_limit,
            None if rpm_left is None else rpm_left if rpm_left > 0 else 0,
            None if rpm_reset is None else rpm_reset if rpm_reset > 0.0 else 0.0,
            tpm_limit,
            None if tpm_left is None else tpm_left if tpm_left > 0 else 0,
            None if tpm_reset is None else tpm_reset if tpm_reset > 0.0 else 0.0,
            ticket if allowed else None,
        ),
    )
