"""Rate limiter shared by every replica through one Redis: one round trip per request.

``acquire`` is one Lua script (EVALSHA) over all of a request's scopes, atomic, on Redis's
clock. The acquires made during one turn of the event loop go to Redis together, as one
call of the script that admits each request in order, all-or-nothing over its own scopes
(up to 256 requests a call); the ``settle`` calls of one turn are likewise one call of the
settle script. A busy replica thereby pays one round trip and one script dispatch for many
requests, not two per request. When Redis fails (unreachable, timeout, script error),
``acquire`` either admits the request with a no-op ticket and reports the error to
``on_failure`` (``failure_mode="open"``) or reports it and raises
``ServiceUnavailableError`` (``"closed"``); ``settle`` only reports (the leases expire on
their own) and never retries, since a timed-out script may have run.

Build the client for this: a ``BlockingConnectionPool`` (the default pool raises
``MaxConnectionsError`` past ``max_connections`` concurrent commands, which fail-open turns
into admissions under exactly the load a limiter exists for), a short ``socket_timeout``
and ``retry=Retry(NoBackoff(), 0)`` or close to it (redis-py's default retries with backoff
hold each request for seconds before the failure mode applies).

A request cancelled while its ``acquire`` is in flight may have been admitted without
getting its ticket: its request and tokens stay counted, and its parallel slot is held
until the lease expires.

Key layout and the Redis Cluster caveat: each scope uses ``<prefix><scope name>:{r,t,p}``.
One call touches the keys of every scope of several requests: this limiter needs a single
Redis (or one primary), not a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol

from redis.exceptions import RedisError

from sluice.errors import ServiceUnavailableError
from sluice.pipeline.limits.base import Admission, Scope, Ticket
from sluice.pipeline.limits.lua import ACQUIRE, REASON_CODES, SETTLE
from sluice.pipeline.limits.window import Usage, build_admission

FailureMode = Literal["open", "closed"]

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_BATCH_MAX = 256  # requests per script call: bounds one call's run time in Redis
_MAX_PLANS = 10_000


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


class ScriptHost(Protocol):
    """What the limiter needs of a Redis client: redis-py's ``Redis`` or `PipelinedRedis`."""

    def register_script(self, script: str) -> Any: ...


class RedisLimiter:
    """``Limiter`` over Redis; several replicas sharing the Redis share the limits."""

    def __init__(
        self,
        redis: ScriptHost,
        *,
        prefix: str = "sluice:rl:",
        failure_mode: FailureMode = "open",
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._failure_mode = failure_mode
        self._on_failure = on_failure
        self._acquire = redis.register_script(ACQUIRE)
        self._settle = redis.register_script(SETTLE)
        self._acquiring: _AcquireBatch | None = None
        self._settling: _SettleBatch | None = None  # open: settles of this loop turn
        self._last_settles: _SettleBatch | None = None  # the newest batch, open or sent
        self._plans: dict[int, _Plan] = {}
        self._lease_seconds = -1.0  # the lease of the last acquire, and it in milliseconds
        self._lease_ms = 1
        self._tasks: set[asyncio.Future[None]] = set()

    async def acquire(
        self, scopes: Sequence[Scope], tokens: int, request_id: str, lease_seconds: float
    ) -> Admission:
        # Runs for every request: no builtin calls where a comparison does (max() and
        # round() cost ~1.6-2k instructions each), no list comprehensions (a function call
        # each in Python 3.11).
        if tokens < 0:
            tokens = 0
        plan = self._plan(scopes)
        if not plan.keys:
            return _unlimited(request_id, tokens)
        loop = asyncio.get_running_loop()
        batch = self._acquiring
        if batch is None:
            batch = self._acquiring = _AcquireBatch()
            loop.call_soon(self._send_acquires)
        answer: asyncio.Future[list[int]] = loop.create_future()
        batch.answers.append((answer, plan))
        batch.keys += plan.keys
        if lease_seconds != self._lease_seconds:  # the guard's lease: constant in practice
            self._lease_seconds = lease_seconds
            self._lease_ms = max(round(lease_seconds * 1000), 1)
        batch.args += (plan.n_scopes, tokens, request_id, self._lease_ms)
        batch.args += plan.limit_args
        if len(batch.answers) >= _BATCH_MAX:
            self._send_acquires()
        try:
            reply = await answer
        except _FAILURES as exc:
            return self._fail(exc, request_id, tokens)

        allowed, code, retry_ms, now_ms = reply[0], reply[1], reply[2], reply[3]
        requests: list[Usage] = []
        for i, limit in plan.rpm_at:  # oldest bucket -1: nothing counted
            oldest = reply[i + 1]
            requests.append((limit, reply[i], None if oldest < 0 else oldest))
        used_tokens: list[Usage] = []
        for i, limit in plan.tpm_at:
            oldest = reply[i + 1]
            used_tokens.append((limit, reply[i], None if oldest < 0 else oldest))
        ticket = None
        if allowed:
            ticket = Ticket(
                request_id, tokens, now_ms // 1000, plan.token_scopes, plan.lease_scopes
            )
        reason = None if allowed else REASON_CODES[code]
        return build_admission(
            allowed != 0, reason, retry_ms / 1000, requests, used_tokens, now_ms / 1000, ticket
        )

    def _send_acquires(self) -> None:
        """Send the open batch of acquires as one script call."""
        batch, self._acquiring = self._acquiring, None
        if batch is not None:
            self._track(self._run_acquires(batch))

    async def _run_acquires(self, batch: _AcquireBatch) -> None:
        try:
            reply: list[int] = await self._acquire(
                keys=batch.keys, args=[len(batch.answers), *batch.args]
            )
        except Exception as exc:  # every waiting request gets it (and applies its mode)
            for answer, _ in batch.answers:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): so are the requests waiting
            for answer, _ in batch.answers:
                answer.cancel()
            raise
        at = 0
        for answer, plan in batch.answers:
            if not answer.done():  # a request cancelled while it waited is skipped
                answer.set_result(reply[at : at + plan.reply_size])
            at += plan.reply_size

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _plan(self, scopes: Sequence[Scope]) -> _Plan:
        """What a call over ``scopes`` sends and reads, built once per scopes object (the
        guard keeps one per key and model)."""
        plan = self._plans.get(id(scopes))
        if plan is None or plan.scopes is not scopes:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[id(scopes)] = _Plan(scopes, self._prefix)
        return plan

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        self.settle_nowait(ticket, actual_tokens)
        batch = self._last_settles  # the batch this settle went into, or a later one
        if batch is not None and not batch.done.done():
            # Shielded: a caller cancelled while it waits must not cancel the batch's future.
            await asyncio.shield(batch.done)

    def settle_nowait(self, ticket: Ticket, actual_tokens: int) -> None:
        if not ticket.claim():
            return
        delta = (actual_tokens if actual_tokens > 0 else 0) - ticket.tokens
        token_scopes = ticket.token_scopes if delta else ()
        if not token_scopes and not ticket.lease_scopes:
            return
        batch = self._settling
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._settling = self._last_settles = _SettleBatch(loop.create_future())
            loop.call_soon(self._send_settles)
        prefix, keys = self._prefix, batch.keys
        for name in token_scopes:
            keys.append(prefix + name + ":t")
        for name in ticket.lease_scopes:
            keys.append(prefix + name + ":p")
        batch.args += (
            len(token_scopes), len(ticket.lease_scopes), ticket.second, delta, ticket.request_id
        )  # fmt: skip
        batch.count += 1
        if batch.count >= _BATCH_MAX:
            self._send_settles()

    def _send_settles(self) -> None:
        """Send the open batch of settles as one script call (a task the batch awaits)."""
        batch, self._settling = self._settling, None
        if batch is not None:
            self._track(self._run_settles(batch))

    async def _run_settles(self, batch: _SettleBatch) -> None:
        try:
            await self._settle(keys=batch.keys, args=[batch.count, *batch.args])
        except _FAILURES as exc:
            self._report(exc)
        finally:
            if not batch.done.done():
                batch.done.set_result(None)

    async def close(self) -> None:
        """Send the calls still waiting; the Redis client belongs to the caller."""
        self._send_acquires()
        self._send_settles()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _fail(self, exc: Exception, request_id: str, tokens: int) -> Admission:
        self._report(exc)
        if self._failure_mode == "closed":
            raise ServiceUnavailableError(
                "rate limiter unavailable", headers={"Retry-After": "1"}
            ) from exc
        return _unlimited(request_id, tokens, noop=True)

    def _report(self, exc: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure(exc)


class _Plan:
    """The constant part of an acquire over one list of scopes: the keys, the limit
    arguments, where each scope's usage sits in the reply, and the ticket's scope names.
    Holding ``scopes`` keeps its id from being reused while the plan is cached."""

    __slots__ = (
        "keys",
        "lease_scopes",
        "limit_args",
        "n_scopes",
        "reply_size",
        "rpm_at",
        "scopes",
        "token_scopes",
        "tpm_at",
    )

    def __init__(self, scopes: Sequence[Scope], prefix: str) -> None:
        self.scopes = scopes
        limited = [scope for scope in scopes if not scope.spec.unlimited]
        self.n_scopes = len(limited)
        self.reply_size = 4 + 4 * len(limited)  # verdict, then 4 numbers per scope
        self.keys: list[str] = []
        self.limit_args: list[int] = []
        self.rpm_at: list[tuple[int, int]] = []  # (reply index of the count, limit)
        self.tpm_at: list[tuple[int, int]] = []
        for i, scope in enumerate(limited):
            base = prefix + scope.name
            self.keys += (base + ":r", base + ":t", base + ":p")
            spec = scope.spec
            self.limit_args += (
                _limit_arg(spec.rpm), _limit_arg(spec.tpm), _limit_arg(spec.max_parallel)
            )  # fmt: skip
            if spec.rpm is not None:
                self.rpm_at.append((4 + 4 * i, spec.rpm))
            if spec.tpm is not None:
                self.tpm_at.append((6 + 4 * i, spec.tpm))
        self.token_scopes = tuple(s.name for s in limited if s.spec.tpm is not None)
        self.lease_scopes = tuple(s.name for s in limited if s.spec.max_parallel is not None)


class _AcquireBatch:
    """The acquires requested during one event-loop turn: one script call for all."""

    __slots__ = ("answers", "args", "keys")

    def __init__(self) -> None:
        self.answers: list[tuple[asyncio.Future[list[int]], _Plan]] = []
        self.keys: list[str] = []
        self.args: list[int | str] = []


class _SettleBatch:
    """The settles requested during one event-loop turn: one script call for all."""

    __slots__ = ("args", "count", "done", "keys")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.keys: list[str] = []
        self.args: list[int | str] = []
        self.count = 0


def _unlimited(request_id: str, tokens: int, *, noop: bool = False) -> Admission:
    """An admission no scope limits (no scopes, or fail-open); its ticket settles as nothing."""
    ticket = Ticket(request_id, tokens=tokens, second=0, noop=noop)
    return build_admission(True, None, 0.0, (), (), 0.0, ticket)
