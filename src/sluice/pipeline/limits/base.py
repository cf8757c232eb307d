"""The rate limiter's vocabulary: limits, scopes, admissions, tickets and the protocol.

A request is checked against several *scopes* at once (the key, the key's model, …); each
scope has its own requests-per-minute, tokens-per-minute and parallel-request limits. The
limiter admits the request into every scope or into none (``acquire``) and later reconciles
the token estimate with the real usage and frees the parallel slot (``settle``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

Reason = Literal["rpm", "tpm", "parallel"]


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Limits of one scope; ``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_parallel is None


@dataclass(frozen=True, slots=True)
class LimitScope:
    """A named counter set, e.g. ``key:abc`` or ``key:abc:model:gpt-4o``."""

    name: str
    spec: LimitSpec


class Ticket:
    """Opaque receipt of an admission; hand it to ``settle`` exactly once (more is harmless).

    ``token_scopes`` are the scopes that reserved tokens, ``lease_scopes`` those that took a
    parallel slot; ``second`` is the bucket (limiter clock, whole seconds) the reservation
    went into; ``wire`` is what the limiter that made it keeps for its settle (the Redis
    limiter: the settle's keys, encoded once per key, and its second and id in RESP). A
    ``noop`` ticket (fail-open admission) settles as nothing. ``settled`` is set by the
    first settle; each limiter's settle checks it first, which makes settling idempotent.
    """

    __slots__ = (
        "lease_scopes",
        "noop",
        "request_id",
        "second",
        "settled",
        "token_scopes",
        "tokens",
        "wire",
    )

    def __init__(
        self,
        request_id: str,
        tokens: int,
        second: int,
        token_scopes: tuple[str, ...] = (),
        lease_scopes: tuple[str, ...] = (),
        wire: Any = None,
        *,
        noop: bool = False,
    ) -> None:
        self.request_id = request_id
        self.tokens = tokens
        self.second = second
        self.token_scopes = token_scopes
        self.lease_scopes = lease_scopes
        self.wire = wire
        self.noop = noop
        self.settled = False

    def __repr__(self) -> str:
        return (
            f"Ticket({self.request_id!r}, tokens={self.tokens}, second={self.second}, "
            f"settled={self.settled}, noop={self.noop})"
        )


class Admission(NamedTuple):
    """The verdict of ``acquire`` plus what OpenAI's ``x-ratelimit-*`` headers need.

    ``reason`` names the limit that refused, in the first refusing scope (rpm, then tpm,
    then parallel within a scope). ``retry_after`` is the wait (seconds) until every
    refusing limit would let this request through: for rpm/tpm the time until enough of
    the oldest buckets leave the window (at most 61 s), 60.0 when the token estimate alone
    exceeds a tpm limit (it can never pass), 1.0 for a full parallel limit; 0 when allowed.
    The header fields come from one scope per kind, chosen by the admission-header rule
    (`window.build_admission`: the least remaining, then the smallest limit, then the
    first), ``None`` when no scope limits it; ``reset_*`` is the time until that scope's
    oldest counted bucket leaves the window (0 when nothing is counted).
    (A named tuple: made once per request, it is several times cheaper than a frozen
    dataclass.)
    """

    allowed: bool
    reason: Reason | None
    retry_after: float
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens: float | None
    ticket: Ticket | None


AcquireNow = Callable[[Sequence[LimitScope], int, str, float], Admission]
"""``Limiter.acquire``'s arguments, answered at once (see ``Limiter.immediate``)."""


class Limiter(Protocol):
    def immediate(self) -> AcquireNow | None:
        """``acquire`` as a plain call returning the admission, for a limiter that decides
        without waiting for anything (in memory); None for one that must wait (Redis), whose
        ``acquire`` the caller awaits. Lets the request path skip a coroutine per request."""
        ...

    def acquire(
        self, scopes: Sequence[LimitScope], tokens: int, request_id: str, lease_seconds: float
    ) -> Awaitable[Admission]:
        """All or nothing over ``scopes``: count the request, reserve ``tokens`` and take a
        parallel slot (a lease expiring after ``lease_seconds``) in each, or change nothing.
        Scope names must be distinct; ``request_id`` must be unique among in-flight requests.
        An awaitable (a coroutine, or the future a batched reply resolves)."""
        ...

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        """Refund or charge ``actual_tokens - reserved`` in the reservation's bucket and free
        the parallel slots. Idempotent per ticket; never raises for backend failures.
        Returns once the settle has taken effect."""
        ...

    def settle_nowait(self, ticket: Ticket, actual_tokens: int) -> None:
        """``settle`` without waiting for it (no coroutine, for the end of every request):
        done at once where no I/O is needed, else queued and sent in the background
        (``close`` sends what is still queued)."""
        ...

    async def close(self) -> None: ...
