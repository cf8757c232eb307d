"""In-process rate limiter: exact per-second windows for one Sluice process.

Safe under asyncio because ``acquire`` and ``settle`` never await inside their critical
section (the whole body runs without yielding to the event loop). Not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sluice.pipeline.limits.base import (
    AcquireNow,
    Admission,
    LimitScope,
    LimitSpec,
    Reason,
    Ticket,
)
from sluice.pipeline.limits.window import (
    NEVER_RETRY_AFTER,
    PARALLEL_RETRY_AFTER,
    WINDOW_BUCKETS,
    Usage,
    build_admission,
    first_live_second,
    seconds_until_freed,
)

_KEPT_SECONDS = WINDOW_BUCKETS - 1  # first_live_second(now) == int(now) - _KEPT_SECONDS


class _Window:
    """Per-second buckets in ascending order (dicts keep insertion order), their sum and
    the oldest bucket's second (None when empty). ``MemoryLimiter.acquire_now`` adds to
    them and ``settle_nowait`` adjusts them in place (no method call per request)."""

    __slots__ = ("buckets", "oldest", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.total = 0
        self.oldest: int | None = None

    def expire(self, first_live: int) -> None:
        """Drop the buckets older than ``first_live`` (cheap when there are none)."""
        oldest = self.oldest
        if oldest is None or oldest >= first_live:
            return
        buckets = self.buckets
        while oldest is not None and oldest < first_live:
            self.total -= buckets.pop(oldest)
            oldest = next(iter(buckets), None)
        self.oldest = oldest

    def wait(self, need: int, now: float) -> float:
        return seconds_until_freed(self.buckets.items(), need, now)

    def usage(self, limit: int) -> Usage:
        return (limit, self.total, self.oldest)


class _ScopeState:
    __slots__ = ("leases", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = _Window()
        self.tokens = _Window()
        self.leases: dict[str, float] = {}  # request id -> expiry (limiter clock)

    def live_leases(self, now: float) -> int:
        """Parallel slots taken, after dropping expired leases (a full scan: called only
        when the slots look full, and by the sweep)."""
        expired = [rid for rid, expiry in self.leases.items() if expiry <= now]
        for rid in expired:
            del self.leases[rid]
        return len(self.leases)

    def refusals(
        self, spec: LimitSpec, tokens: int, now: float
    ) -> list[tuple[Reason, float]] | None:
        """Each limit of ``spec`` that would refuse the request, with its wait; None if none."""
        out: list[tuple[Reason, float]] | None = None
        rpm, tpm, max_parallel = spec.rpm, spec.tpm, spec.max_parallel
        if rpm is not None and self.requests.total + 1 > rpm:
            need = self.requests.total + 1 - rpm
            out = [("rpm", NEVER_RETRY_AFTER if rpm < 1 else self.requests.wait(need, now))]
        if tpm is not None and self.tokens.total + tokens > tpm:
            need = self.tokens.total + tokens - tpm
            wait = NEVER_RETRY_AFTER if tokens > tpm else self.tokens.wait(need, now)
            out = (out or []) + [("tpm", wait)]
        if (
            max_parallel is not None
            and len(self.leases) >= max_parallel
            and self.live_leases(now) >= max_parallel
        ):
            wait = NEVER_RETRY_AFTER if max_parallel < 1 else PARALLEL_RETRY_AFTER
            out = (out or []) + [("parallel", wait)]
        return out


class MemoryLimiter:
    """``Limiter`` over in-process state; ``clock`` (seconds, monotonic) is injectable."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, sweep_interval: float = 60.0
    ) -> None:
        self._clock = clock
        self._scopes: dict[str, _ScopeState] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep = clock() + sweep_interval
        # The current second (int) and when it ends, kept between calls: int(now) and the
        # sweep's check once a second instead of every request.
        self._second = 0
        self._second_ends = float("-inf")

    def immediate(self) -> AcquireNow:
        """`acquire_now`: the memory limiter never waits for anything."""
        return self.acquire_now

    async def acquire(
        self, scopes: Sequence[LimitScope], tokens: int, request_id: str, lease_seconds: float
    ) -> Admission:
        return self.acquire_now(scopes, tokens, request_id, lease_seconds)

    def acquire_now(
        self, scopes: Sequence[LimitScope], tokens: int, request_id: str, lease_seconds: float
    ) -> Admission:
        """``acquire`` without a coroutine: the memory limiter never waits for anything."""
        # Runs for every request of a limited key, so written out flat: no helper calls in
        # the common case but the header rule's (a Python call, even max(), costs more than
        # the arithmetic here).
        now = self._clock()
        if not self._second <= now < self._second_ends:
            self._new_second(now)
        second = self._second
        first_live = second - _KEPT_SECONDS
        if tokens < 0:
            tokens = 0
        states = self._scopes
        maybe_refused = False
        for scope in scopes:
            state = states.get(scope.name)
            if state is None:
                state = states[scope.name] = _ScopeState()
            spec = scope.spec
            requests, used = state.requests, state.tokens
            if requests.oldest is not None and requests.oldest < first_live:
                requests.expire(first_live)
            if used.oldest is not None and used.oldest < first_live:
                used.expire(first_live)
            if (
                (spec.rpm is not None and requests.total >= spec.rpm)
                or (spec.tpm is not None and used.total + tokens > spec.tpm)
                or (spec.max_parallel is not None and len(state.leases) >= spec.max_parallel)
            ):
                maybe_refused = True
        if maybe_refused:  # the full check, which also drops expired leases
            refused = self._refusal(scopes, tokens, now)
            if refused is not None:
                return refused

        # Admit into every scope; the headers' numbers are chosen among the scopes by
        # window.build_admission, the one rule (the Lua script has its own copy).
        token_scopes: tuple[str, ...] = ()
        lease_scopes: tuple[str, ...] = ()
        request_usage: list[Usage] = []
        token_usage: list[Usage] = []
        for scope in scopes:
            spec, state, name = scope.spec, states[scope.name], scope.name
            limit = spec.rpm
            if limit is not None:
                window = state.requests
                buckets = window.buckets
                if second in buckets:
                    buckets[second] += 1
                else:
                    buckets[second] = 1
                    if window.oldest is None:
                        window.oldest = second
                window.total += 1
                request_usage.append((limit, window.total, window.oldest))
            limit = spec.tpm
            if limit is not None:
                window = state.tokens
                buckets = window.buckets
                if second in buckets:
                    buckets[second] += tokens
                else:
                    buckets[second] = tokens
                    if window.oldest is None:
                        window.oldest = second
                window.total += tokens
                token_usage.append((limit, window.total, window.oldest))
                token_scopes += (name,)
            if spec.max_parallel is not None:
                state.leases[request_id] = now + lease_seconds
                lease_scopes += (name,)
        ticket = Ticket(request_id, tokens, second, token_scopes, lease_scopes)
        return build_admission(True, None, 0.0, request_usage, token_usage, now, ticket)

    def _new_second(self, now: float) -> None:
        """A new second has begun at ``now`` (or the clock went back): sweep when due."""
        if now >= self._next_sweep:
            self._sweep(now)
        self._second = int(now)
        self._second_ends = self._second + 1.0

    def _refusal(self, scopes: Sequence[LimitScope], tokens: int, now: float) -> Admission | None:
        """The refusal for a request some limit may refuse; None when none does."""
        checked = [(scope.spec, self._scopes[scope.name]) for scope in scopes]
        reason: Reason | None = None
        retry_after = 0.0
        for spec, state in checked:
            refusals = state.refusals(spec, tokens, now)
            if refusals is not None:
                reason = reason or refusals[0][0]
                retry_after = max(retry_after, *(wait for _, wait in refusals))
        if reason is None:
            return None
        requests = [s.requests.usage(spec.rpm) for spec, s in checked if spec.rpm is not None]
        tokens_used = [s.tokens.usage(spec.tpm) for spec, s in checked if spec.tpm is not None]
        return build_admission(False, reason, retry_after, requests, tokens_used, now, None)

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        self.settle_nowait(ticket, actual_tokens)

    def settle_nowait(self, ticket: Ticket, actual_tokens: int) -> None:
        """``settle``, done at once (flat, like ``acquire_now``)."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.noop:
            return
        states = self._scopes
        delta = (actual_tokens if actual_tokens > 0 else 0) - ticket.tokens
        if delta and ticket.token_scopes:
            # Only a bucket still counted is adjusted (an expired one is gone from the dict
            # and its second never comes back); no clock read needed.
            second = ticket.second
            for name in ticket.token_scopes:
                state = states.get(name)
                if state is not None:
                    window = state.tokens
                    if second in window.buckets:
                        window.buckets[second] += delta
                        window.total += delta
        for name in ticket.lease_scopes:
            state = states.get(name)
            if state is not None:
                state.leases.pop(ticket.request_id, None)

    async def close(self) -> None:
        self._scopes.clear()

    def _sweep(self, now: float) -> None:
        """Forget scopes with nothing counted and nothing in flight (bounded memory), and
        leases past their expiry."""
        first_live = first_live_second(now)
        idle = []
        for name, state in self._scopes.items():
            state.requests.expire(first_live)
            state.tokens.expire(first_live)
            quiet = not state.requests.buckets and not state.tokens.buckets
            if not state.live_leases(now) and quiet:
                idle.append(name)
        for name in idle:
            del self._scopes[name]
        self._next_sweep = now + self._sweep_interval
