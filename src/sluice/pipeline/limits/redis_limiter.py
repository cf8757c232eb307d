"""Rate limiter shared by every replica through one Redis: one round trip per request.

``acquire`` is one Lua script (EVALSHA) over all of a request's scopes, atomic, on Redis's
clock. The acquires made during one turn of the event loop go to Redis together, as one
call of the script that admits each request in order, all-or-nothing over its own scopes
(up to 256 requests a call); the ``settle`` calls of one turn are likewise one call of the
settle script. A busy replica thereby pays one round trip and one script dispatch for many
requests, not two per request. The script answers each request with its verdict and the
numbers of its ``x-ratelimit-*`` headers, already chosen among its scopes, so a reply is
turned into an admission without a loop over scopes. ``acquire`` is not a coroutine: it
returns the future the batch's reply resolves (the reply arrives in a protocol callback,
`wire.Script.send`: no task or coroutine per call). When Redis fails (unreachable,
timeout, script error), the admission either admits the request with a no-op ticket and
reports the error to ``on_failure`` (``failure_mode="open"``) or reports it and raises
``ServiceUnavailableError`` (``"closed"``); ``settle`` only reports (the leases expire on
their own) and never retries, since a timed-out script may have run.

The client is a `sluice.pipeline.limits.wire.PipelinedRedis` (one pipelined connection, a
short timeout, no retries: a retry with backoff would hold each request for seconds before
the failure mode applies). The limiter sends its calls already encoded as RESP
(``Script.run_packed``): each key's keys and limits are encoded once, and a request adds only
its token estimate and id (hiredis's packing formatted every argument of every call again:
a ``sprintf`` each, ~11k instructions a request).

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
from functools import partial
from typing import Any, Literal, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sluice.errors import ServiceUnavailableError
from sluice.pipeline.limits.base import Admission, Scope, Ticket
from sluice.pipeline.limits.lua import ACQUIRE, REASON_CODES, SETTLE
from sluice.pipeline.limits.window import build_admission, new_tuple
from sluice.pipeline.limits.wire import Sink, bulk, bulks

FailureMode = Literal["open", "closed"]

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_BATCH_MAX = 256  # requests per script call: bounds one call's run time in Redis
_MAX_PLANS = 10_000
# A request's variable arguments, as RESP bulk strings: acquire (tokens, request id) and
# settle (second, delta, request id).
_ACQUIRE_VALUES = b"$%d\r\n%b\r\n$%d\r\n%b\r\n"
_SETTLE_VALUES = b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
_SETTLE_ARGS = 5  # per settle: token scopes, lease scopes, second, delta, request id
_ANSWER_SIZE = 10  # numbers per request in the acquire script's reply (lua.py)


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


class PackedScript(Protocol):
    def send(self, keys: int, items: int, body: bytes, sink: Sink) -> bool: ...


class ScriptHost(Protocol):
    """What the limiter needs of a Redis client: `PipelinedRedis`."""

    def register_script(self, script: str) -> PackedScript: ...

    async def connect(self) -> None: ...


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
        # ticket's (token scopes, lease scopes) -> its settle's keys and scope counts in RESP
        self._settle_keys: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[bytes, int, bytes]]
        self._settle_keys = {}
        self._lease_seconds = -1.0  # the lease of the last acquire, and it in RESP (ms)
        self._lease = bulk(b"1")
        self._tasks: set[asyncio.Future[None]] = set()

    def acquire(
        self, scopes: Sequence[Scope], tokens: int, request_id: str, lease_seconds: float
    ) -> asyncio.Future[Admission]:
        # Runs for every request: no builtin calls where a comparison does (max() and
        # round() cost ~1.6-2k instructions each), no list comprehensions (a function call
        # each in Python 3.11).
        if tokens < 0:
            tokens = 0
        plan = self._plan(scopes)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Admission] = loop.create_future()
        if not plan.keys:
            answer.set_result(_unlimited(request_id, tokens))
            return answer
        batch = self._acquiring
        if batch is None:
            batch = self._acquiring = _AcquireBatch()
            loop.call_soon(self._send_acquires)
        batch.answers.append((answer, plan, request_id, tokens))
        batch.keys.append(plan.keys)
        batch.n_keys += plan.n_keys
        if lease_seconds != self._lease_seconds:  # the guard's lease: constant in practice
            self._lease_seconds = lease_seconds
            self._lease = bulk(b"%d" % max(round(lease_seconds * 1000), 1))
        encoded_tokens, rid = b"%d" % tokens, request_id.encode()
        values = _ACQUIRE_VALUES % (len(encoded_tokens), encoded_tokens, len(rid), rid)
        batch.args += (plan.head, values, self._lease, plan.limits)
        batch.n_args += plan.n_args
        if len(batch.answers) >= _BATCH_MAX:
            self._send_acquires()
        return answer

    def _send_acquires(self) -> None:
        """Send the open batch of acquires as one script call."""
        batch, self._acquiring = self._acquiring, None
        if batch is not None:
            count = bulk(b"%d" % len(batch.answers))
            body = b"".join(batch.keys) + count + b"".join(batch.args)
            items = batch.n_keys + 1 + batch.n_args
            self._send(self._acquire, batch.n_keys, items, body, partial(self._admit, batch))

    def _admit(self, batch: _AcquireBatch, reply: Any) -> None:
        """The sink of an acquire call: each waiting request's admission from its ten
        numbers (lua.py), or the failure mode applied to each."""
        if isinstance(reply, BaseException):
            self._fail_batch(batch, reply)
            return
        at = 0
        for answer, plan, request_id, tokens in batch.answers:
            if not answer.done():  # a request cancelled while it waited is skipped
                allowed, code, retry_ms, now_ms = reply[at : at + 4]
                rpm, rpm_left, rpm_reset, tpm, tpm_left, tpm_reset = reply[at + 4 : at + 10]
                ticket = None
                if allowed:
                    second = now_ms // 1000
                    ticket = Ticket(
                        request_id, tokens, second, plan.token_scopes, plan.lease_scopes
                    )
                # In Admission's field order, by tuple.__new__ (window.new_tuple); a limit
                # of -1: no scope has that limit.
                answer.set_result(
                    new_tuple(
                        Admission,
                        (
                            allowed == 1,
                            None if allowed else REASON_CODES[code],
                            0.0 if allowed else retry_ms / 1000,
                            None if rpm < 0 else rpm,
                            None if rpm < 0 else rpm_left,
                            None if rpm < 0 else rpm_reset / 1000,
                            None if tpm < 0 else tpm,
                            None if tpm < 0 else tpm_left,
                            None if tpm < 0 else tpm_reset / 1000,
                            ticket,
                        ),
                    )
                )
            at += _ANSWER_SIZE

    def _fail_batch(self, batch: _AcquireBatch, error: BaseException) -> None:
        for answer, _, request_id, tokens in batch.answers:
            if answer.done():
                continue
            if not isinstance(error, _FAILURES):  # not Redis's failure: the request's error
                answer.set_exception(error)
                continue
            try:
                answer.set_result(self._fail(error, request_id, tokens))
            except ServiceUnavailableError as refusal:
                answer.set_exception(refusal)

    def _send(self, script: PackedScript, keys: int, items: int, body: bytes, sink: Sink) -> None:
        """One script call; when no connection is open, a task opens one first."""
        if not script.send(keys, items, body, sink):
            self._track(self._send_when_connected(script, keys, items, body, sink))

    async def _send_when_connected(
        self, script: PackedScript, keys: int, items: int, body: bytes, sink: Sink
    ) -> None:
        try:
            await self._redis.connect()
            if not script.send(keys, items, body, sink):
                raise RedisConnectionError("Redis connection lost as it opened")
        except Exception as exc:  # the call's sink gets it (and applies the failure mode)
            sink(exc)
        except BaseException:  # cancelled (shutdown): so is the call
            sink(RedisConnectionError("the limiter's Redis call was cancelled"))
            raise

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
        scopes = (token_scopes, ticket.lease_scopes)
        encoded = self._settle_keys.get(scopes)
        if encoded is None:
            encoded = self._encode_settle_keys(scopes)
        keys, n_keys, counts = encoded
        batch.keys.append(keys)
        batch.n_keys += n_keys
        second, encoded_delta = b"%d" % ticket.second, b"%d" % delta
        rid = ticket.request_id.encode()
        values = _SETTLE_VALUES % (
            len(second), second, len(encoded_delta), encoded_delta, len(rid), rid
        )  # fmt: skip
        batch.args += (counts, values)
        batch.count += 1
        if batch.count >= _BATCH_MAX:
            self._send_settles()

    def _encode_settle_keys(
        self, scopes: tuple[tuple[str, ...], tuple[str, ...]]
    ) -> tuple[bytes, int, bytes]:
        """A settle's keys and its two scope counts in RESP, made once per scope tuple."""
        token_scopes, lease_scopes = scopes
        names = [self._prefix + name + ":t" for name in token_scopes]
        names += [self._prefix + name + ":p" for name in lease_scopes]
        if len(self._settle_keys) >= _MAX_PLANS:
            self._settle_keys.clear()
        encoded = (bulks(*names), len(names), bulks(len(token_scopes), len(lease_scopes)))
        self._settle_keys[scopes] = encoded
        return encoded

    def _send_settles(self) -> None:
        """Send the open batch of settles as one script call."""
        batch, self._settling = self._settling, None
        if batch is not None:
            count = bulk(b"%d" % batch.count)
            body = b"".join(batch.keys) + count + b"".join(batch.args)
            items = batch.n_keys + 1 + _SETTLE_ARGS * batch.count
            self._send(self._settle, batch.n_keys, items, body, partial(self._settled, batch))

    def _settled(self, batch: _SettleBatch, reply: Any) -> None:
        """The sink of a settle call: failures are only reported (see the module)."""
        if isinstance(reply, Exception):
            self._report(reply)
        if not batch.done.done():
            batch.done.set_result(None)

    async def close(self) -> None:
        """Send the calls still waiting and wait for the settles' replies (bounded by the
        client's timeout); the Redis client belongs to the caller."""
        self._send_acquires()
        self._send_settles()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        last = self._last_settles  # replies are ordered: the last one answered means all
        if last is not None and not last.done.done():
            await last.done

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
    """The constant part of an acquire over one list of scopes: the keys and the limit
    arguments in RESP, and the ticket's scope names. Holding ``scopes`` keeps its id from
    being reused while the plan is cached."""

    __slots__ = ("head", "keys", "lease_scopes", "limits", "n_args", "n_keys", "scopes",
                 "token_scopes")  # fmt: skip

    def __init__(self, scopes: Sequence[Scope], prefix: str) -> None:
        self.scopes = scopes
        limited = [scope for scope in scopes if not scope.spec.unlimited]
        keys: list[str] = []
        limits: list[int] = []
        for scope in limited:
            base = prefix + scope.name
            keys += (base + ":r", base + ":t", base + ":p")
            spec = scope.spec
            limits += (_limit_arg(spec.rpm), _limit_arg(spec.tpm), _limit_arg(spec.max_parallel))
        self.token_scopes = tuple(s.name for s in limited if s.spec.tpm is not None)
        self.lease_scopes = tuple(s.name for s in limited if s.spec.max_parallel is not None)
        # In RESP: the keys; the scope count (the request's first argument); the limits (its
        # last). Between them go the token estimate, the request id and the lease.
        self.keys = bulks(*keys)
        self.n_keys = len(keys)
        self.head = bulks(len(limited))
        self.limits = bulks(*limits)
        self.n_args = 4 + len(limits)


class _AcquireBatch:
    """The acquires requested during one event-loop turn: one script call for all. Keys
    and arguments are RESP bulk strings, ``n_keys`` and ``n_args`` of them."""

    __slots__ = ("answers", "args", "keys", "n_args", "n_keys")

    def __init__(self) -> None:
        # per request: its answer, its plan, request id and token estimate
        self.answers: list[tuple[asyncio.Future[Admission], _Plan, str, int]] = []
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.n_keys = 0
        self.n_args = 0


class _SettleBatch:
    """The settles requested during one event-loop turn: one script call for all (keys
    and arguments in RESP, as in `_AcquireBatch`)."""

    __slots__ = ("args", "count", "done", "keys", "n_keys")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.n_keys = 0
        self.count = 0


def _unlimited(request_id: str, tokens: int, *, noop: bool = False) -> Admission:
    """An admission no scope limits (no scopes, or fail-open); its ticket settles as nothing."""
    ticket = Ticket(request_id, tokens=tokens, second=0, noop=noop)
    return build_admission(True, None, 0.0, (), (), 0.0, ticket)
