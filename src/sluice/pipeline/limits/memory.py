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
    """Per-second buckets in ascending order (dicts keep insertion order) and their sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.total = 0

    def expire(self, first_live: int) -> None:
        buckets = self.buckets
        while buckets:
            second = next(iter(buckets))
            if second >= first_live:
                return
            self.total -= buckets.pop(second)

    def add(self, second: int, amount: int) -> None:
        self.buckets[second] = self.buckets.get(second, 0) + amount
        self.total += amount

    def adjust(self, second: int, delta: int) -> None:
        """Change an existing bucket; a bucket that already left the window stays gone."""
        if second in self.buckets:
            self.buckets[second] += delta
            self.total += delta

    def oldest(self) -> int | None:
        return next(iter(self.buckets), None)

    def wait(self, need: int, now: float) -> float:
        return seconds_until_freed(self.buckets.items(), need, now)

    def usage(self, limit: int) -> Usage:
        return Usage(limit, self.total, next(iter(self.buckets), None))


class _ScopeState:
    __slots__ = ("leases", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = _Window()
        self.tokens = _Window()
        self.leases: dict[str, float] = {}  # request id -> expiry (limiter clock)

    def live_leases(self, now: float) -> int:
        if self.leases:
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
        if max_parallel is not None and self.live_leases(now) >= max_parallel:
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
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        first_live = first_live_second(now)
        tokens = max(tokens, 0)
        checked: list[tuple[LimitSpec, _ScopeState, str]] = []
        reason: Reason | None = None
        retry_after = 0.0
        for scope in scopes:
            spec = scope.spec
            if spec.unlimited:
                continue
            state = self._scopes.get(scope.name)
            if state is None:
                state = self._scopes[scope.name] = _ScopeState()
            state.requests.expire(first_live)
            state.tokens.expire(first_live)
            refusals = state.refusals(spec, tokens, now)
            if refusals is not None:
                reason = reason or refusals[0][0]
                retry_after = max(retry_after, *(wait for _, wait in refusals))
            checked.append((spec, state, scope.name))

        ticket: Ticket | None = None
        if reason is None:
            second = int(now)
            token_scopes: list[str] = []
            lease_scopes: list[str] = []
            for spec, state, name in checked:
                if spec.rpm is not None:
                    state.requests.add(second, 1)
                if spec.tpm is not None:
                    state.tokens.add(second, tokens)
                    token_scopes.append(name)
                if spec.max_parallel is not None:
                    state.leases[request_id] = now + lease_seconds
                    lease_scopes.append(name)
            ticket = Ticket(
                request_id,
                tokens=tokens,
                second=second,
                token_scopes=tuple(token_scopes),
                lease_scopes=tuple(lease_scopes),
            )
        requests: list[Usage] = []
        used_tokens: list[Usage] = []
        for spec, state, _ in checked:
            if spec.rpm is not None:
                requests.append(state.requests.usage(spec.rpm))
            if spec.tpm is not None:
                used_tokens.append(state.tokens.usage(spec.tpm))
        return build_admission(
            allowed=reason is None,
            reason=reason,
            retry_after=retry_after,
            requests=requests,
            tokens=used_tokens,
            now=now,
            ticket=ticket,
        )

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
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
        """Forget scopes with nothing counted and nothing in flight (bounded memory)."""
        first_live = first_live_second(now)
        idle = []
        for name, state in self._scopes.items():
            state.requests.expire(first_live)
            state.tokens.expire(first_live)
            quiet = not state.requests.buckets and not state.tokens.buckets
            if quiet and not state.live_leases(now):
                idle.append(name)
        for name in idle:
            del self._scopes[name]
        self._next_sweep = now + self._sweep_interval
