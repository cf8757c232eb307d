"""In-process rate limiter: exact per-second windows for one Sluice process.

Safe under asyncio because ``acquire`` and ``settle`` never await inside their critical
section (the whole body runs without yielding to the event loop). Not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sluice.pipeline.limits.base import Admission, LimitSpec, Reason, Scope, Ticket
from sluice.pipeline.limits.window import (
    NEVER_RETRY_AFTER,
    PARALLEL_RETRY_AFTER,
    Usage,
    build_admission,
    first_live_second,
    seconds_until_freed,
)


class _Window:
    """Per-second buckets in ascending order (dicts keep insertion order), their sum and
    the oldest bucket's second (None when empty)."""

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

    def add(self, second: int, amount: int) -> None:
        buckets = self.buckets
        if second in buckets:
            buckets[second] += amount
        else:
            buckets[second] = amount
            if self.oldest is None:
                self.oldest = second
        self.total += amount

    def adjust(self, second: int, delta: int) -> None:
        """Change an existing bucket; a bucket that already left the window stays gone."""
        if second in self.buckets:
            self.buckets[second] += delta
            self.total += delta

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

    async def acquire(
        self, scopes: Sequence[Scope], tokens: int, request_id: str, lease_seconds: float
    ) -> Admission:
        return self.acquire_now(scopes, tokens, request_id, lease_seconds)

    def acquire_now(
        self, scopes: Sequence[Scope], tokens: int, request_id: str, lease_seconds: float
    ) -> Admission:
        """``acquire`` without a coroutine: the memory limiter never waits for anything."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        second = int(now)
        first_live = first_live_second(now)
        if tokens < 0:
            tokens = 0
        states = self._scopes
        checked: list[tuple[LimitSpec, _ScopeState, str]] = []
        maybe_refused = False
        for scope in scopes:
            spec = scope.spec
            if spec.unlimited:
                continue
            name = scope.name
            state = states.get(name)
            if state is None:
                state = states[name] = _ScopeState()
            requests, used = state.requests, state.tokens
            requests.expire(first_live)
            used.expire(first_live)
            rpm, tpm, max_parallel = spec.rpm, spec.tpm, spec.max_parallel
            if (
                (rpm is not None and requests.total >= rpm)
                or (tpm is not None and used.total + tokens > tpm)
                or (max_parallel is not None and len(state.leases) >= max_parallel)
            ):
                maybe_refused = True
            checked.append((spec, state, name))
        if maybe_refused:  # the full check, which also drops expired leases
            refused = self._refusal(checked, tokens, now)
            if refused is not None:
                return refused

        token_scopes: list[str] = []
        lease_scopes: list[str] = []
        requests_usage: list[Usage] = []
        tokens_usage: list[Usage] = []
        for spec, state, name in checked:
            if spec.rpm is not None:
                state.requests.add(second, 1)
                requests_usage.append(state.requests.usage(spec.rpm))
            if spec.tpm is not None:
                state.tokens.add(second, tokens)
                tokens_usage.append(state.tokens.usage(spec.tpm))
                token_scopes.append(name)
            if spec.max_parallel is not None:
                state.leases[request_id] = now + lease_seconds
                lease_scopes.append(name)
        ticket = Ticket(request_id, tokens, second, tuple(token_scopes), tuple(lease_scopes))
        return build_admission(True, None, 0.0, requests_usage, tokens_usage, now, ticket)

    def _refusal(
        self, checked: list[tuple[LimitSpec, _ScopeState, str]], tokens: int, now: float
    ) -> Admission | None:
        """The refusal for a request some limit may refuse; None when none does."""
        reason: Reason | None = None
        retry_after = 0.0
        for spec, state, _ in checked:
            refusals = state.refusals(spec, tokens, now)
            if refusals is not None:
                reason = reason or refusals[0][0]
                retry_after = max(retry_after, *(wait for _, wait in refusals))
        if reason is None:
            return None
        requests = [s.requests.usage(spec.rpm) for spec, s, _ in checked if spec.rpm is not None]
        tokens_used = [s.tokens.usage(spec.tpm) for spec, s, _ in checked if spec.tpm is not None]
        return build_admission(False, reason, retry_after, requests, tokens_used, now, None)

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        self.settle_now(ticket, actual_tokens)

    def settle_now(self, ticket: Ticket, actual_tokens: int) -> None:
        """``settle`` without a coroutine."""
        if not ticket.claim():
            return
        delta = max(actual_tokens, 0) - ticket.tokens
        if delta and ticket.second >= first_live_second(self._clock()):
            for name in ticket.token_scopes:
                state = self._scopes.get(name)
                if state is not None:
                    state.tokens.adjust(ticket.second, delta)
        for name in ticket.lease_scopes:
            state = self._scopes.get(name)
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
