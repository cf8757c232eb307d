"""Rate limiter shared by every replica through one Redis: one round trip per request.

``acquire`` is one Lua script (EVALSHA) over all of a request's scopes, atomic, on Redis's
clock. The acquires and settles made during one turn of the event loop go to Redis
together, as one call of the script, which first settles each ticket and then admits each
request in order, all-or-nothing over its own scopes (up to 256 of each a call). A busy
replica thereby pays one round trip and one script dispatch for many requests, not two per
request. The script answers each request with its verdict and the
numbers of its ``x-ratelimit-*`` headers, already chosen among its scopes, so a reply is
turned into an admission without a loop over scopes. ``acquire`` is not a coroutine: it
returns the future the batch's reply resolves (the reply arrives in a protocol callback,
`wire.Script.send`: no task or coroutine per call). When Redis fails (unreachable,
timeout, script error), the admission either admits the request with a no-op ticket and
reports the error to ``on_failure`` (``failure_mode="open"``) or reports it and raises
``ServiceUnavailableError`` (``"closed"``); ``settle`` only reports (the leases expire on
their own) and never retries, since a timed-out script may have run.

Parallel slots are short leases, renewed while their requests run and released when an
acquire's reply was lost after the call was sent (`sluice.pipeline.limits.leases`): the
request path only adds a ticket to the keeper's ``live`` dict and pops it at settle.

The client is a `sluice.pipeline.limits.wire.PipelinedRedis` (one pipelined connection, a
short timeout, no retries: a retry with backoff would hold each request for seconds before
the failure mode applies). The limiter sends its calls already encoded as RESP
(``Script.run_packed``): each key's keys and limits are encoded once, and a request adds only
its token estimate and id (hiredis's packing formatted every argument of every call again,
a ``sprintf`` each).

A request cancelled while its ``acquire`` is in flight may have been admitted without
getting its ticket: when the reply arrives, such an admission is settled at once (its
tokens refunded, its slot freed); its request stays counted.

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
from sluice.pipeline.limits.base import Admission, LimitScope, Ticket
from sluice.pipeline.limits.leases import LeaseKeeper
from sluice.pipeline.limits.lua import REASON_CODES, RENEW_SCRIPT, SCRIPT
from sluice.pipeline.limits.window import build_admission, new_tuple
from sluice.pipeline.limits.wire import Sink, bulk, bulks

FailureMode = Literal["open", "closed"]

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_BATCH_MAX = 256  # requests per script call: bounds one call's run time in Redis
_MAX_PLANS = 10_000
_SETTLE_ARGS = 5  # per settle: token scopes, lease scopes, delta, second, request id
_ANSWER_SIZE = 10  # numbers per request in the script's reply (lua.py)


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
        max_hold: float = 3600.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._failure_mode = failure_mode
        self._on_failure = on_failure
        self._script = redis.register_script(SCRIPT)
        self.leases = LeaseKeeper(
            redis.connect, redis.register_script(RENEW_SCRIPT), self._script,
            on_failure=self._report, max_hold=max_hold,
        )  # fmt: skip
        self._live = self.leases.live  # ticket -> renewal round; inline on the request path
        self._open: _Batch | None = None  # the calls of this loop turn
        self._last: _Batch | None = None  # the newest batch, open or sent
        self._plans: dict[int, _Plan] = {}
        self._lease_seconds = -1.0  # the lease of the last acquire, and it in RESP (ms)
        self._lease = bulk(b"1")
        self._tasks: set[asyncio.Future[None]] = set()

    def immediate(self) -> None:
        """None: every answer waits for Redis (`acquire`'s future)."""
        return None

    def acquire(
        self, scopes: Sequence[LimitScope], tokens: int, request_id: str, lease_seconds: float
    ) -> asyncio.Future[Admission]:
        # Runs for every request: no builtin calls where a comparison does (a call to max()
        # or round() costs more than the comparison), no list comprehensions (a function
        # call each in Python 3.11).
        if tokens < 0:
            tokens = 0
        plan = self._plans.get(id(scopes))
        if plan is None or plan.scopes is not scopes:
            plan = self._plan(scopes)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Admission] = loop.create_future()
        if not plan.keys:
            answer.set_result(_unlimited(request_id, tokens))
            return answer
        batch = self._open
        if batch is None:
            batch = self._open = self._last = _Batch()
            loop.call_soon(self._send)
        batch.keys.append(plan.keys)
        batch.n_keys += plan.n_keys
        if lease_seconds != self._lease_seconds:  # the admit step's lease: constant in practice
            self._lease_seconds = lease_seconds
            self._lease = bulk(b"%d" % max(round(lease_seconds * 1000), 1))
            self.leases.saw(lease_seconds)
        # The token estimate and the request id in RESP; the id's bulk string is kept for
        # the settle (see _answered).
        encoded_tokens, encoded_rid = b"%d" % tokens, request_id.encode()
        rid = b"$%d\r\n%b\r\n" % (len(encoded_rid), encoded_rid)
        values = b"$%d\r\n%b\r\n%b" % (len(encoded_tokens), encoded_tokens, rid)
        batch.answers.append((answer, plan, request_id, tokens, rid, self._lease))
        batch.args += (plan.head, values, self._lease, plan.limits)
        batch.n_args += plan.n_args
        if len(batch.answers) >= _BATCH_MAX:
            self._send()
        return answer

    def _send(self) -> None:
        """Send the open batch as one script call: its settles' keys, then its acquires';
        its settles' arguments, then its acquires' (lua.py). When no connection is open, a
        task opens one first."""
        batch, self._open = self._open, None
        if batch is None:
            return
        body = b"".join(
            (*batch.settle_keys, *batch.keys, bulk(b"%d" % batch.settles), *batch.settle_args,
             bulk(b"%d" % len(batch.answers)), *batch.args)
        )  # fmt: skip
        keys = batch.n_settle_keys + batch.n_keys
        items = keys + 2 + _SETTLE_ARGS * batch.settles + batch.n_args
        sink = partial(self._answered, batch)
        if self._script.send(keys, items, body, sink):
            batch.sent = True
        else:
            self._track(self._send_when_connected(batch, keys, items, body, sink))

    async def _send_when_connected(
        self, batch: _Batch, keys: int, items: int, body: bytes, sink: Sink
    ) -> None:
        try:
            await self._redis.connect()
            if not self._script.send(keys, items, body, sink):
                raise RedisConnectionError("Redis connection lost as it opened")
            batch.sent = True
        except Exception as exc:  # the call's sink gets it (and applies the failure mode)
            sink(exc)
        except BaseException:  # cancelled (shutdown): so is the call
            sink(RedisConnectionError("the limiter's Redis call was cancelled"))
            raise

    def _answered(self, batch: _Batch, reply: Any) -> None:
        """The sink of a script call: each waiting request's admission from its ten numbers
        (lua.py), or the failure mode applied to each; a failure of the settles is only
        reported (see the module)."""
        batch.over = True
        if batch.done is not None and not batch.done.done():
            batch.done.set_result(None)
        if isinstance(reply, BaseException):
            if batch.answers:
                if batch.sent:  # the script may have run: release the slots it may have taken
                    self.leases.lost(
                        (*plan.settle_wire[1], rid)
                        for _, plan, _, _, rid, _ in batch.answers
                        if plan.lease_scopes
                    )
                self._fail_batch(batch, reply)
            elif isinstance(reply, Exception):
                self._report(reply)
            return
        at = 0
        second_bulk = b""  # the reservations' second in RESP: one clock reading a call
        live = self._live
        for answer, plan, request_id, tokens, rid, lease in batch.answers:
            if answer.done():  # cancelled while it waited: an admission is undone at once
                if reply[at]:
                    self._undo(reply[at + 3], plan, request_id, tokens, rid)
            else:
                (
                    allowed,
                    code,
                    retry_ms,
                    now_ms,
                    rpm,
                    rpm_left,
                    rpm_reset,
                    tpm,
                    tpm_left,
                    tpm_reset,
                ) = reply[at : at + _ANSWER_SIZE]
                ticket = None
                if allowed:
                    second = now_ms // 1000
                    if not second_bulk:
                        second_bulk = bulk(b"%d" % second)
                    # For its settle: the keys (by its plan) and the second and id in RESP.
                    ticket = Ticket(
                        request_id, tokens, second, plan.token_scopes, plan.lease_scopes,
                        (plan.settle_wire, second_bulk + rid),
                    )  # fmt: skip
                    if plan.lease_scopes:  # renewed until settled
                        live[ticket] = lease
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
        if live and not self.leases.running:
            self.leases.start()

    def _undo(self, now_ms: int, plan: _Plan, request_id: str, tokens: int, rid: bytes) -> None:
        """Settle an admission whose request went away while it waited (nothing used)."""
        second = now_ms // 1000
        tail = bulk(b"%d" % second) + rid
        ticket = Ticket(
            request_id, tokens, second, plan.token_scopes, plan.lease_scopes,
            (plan.settle_wire, tail),
        )  # fmt: skip
        self.settle_nowait(ticket, 0)

    def _fail_batch(self, batch: _Batch, error: BaseException) -> None:
        for answer, _, request_id, tokens, _, _ in batch.answers:
            if answer.done():
                continue
            if not isinstance(error, _FAILURES):  # not Redis's failure: the request's error
                answer.set_exception(error)
                continue
            try:
                answer.set_result(self._fail(error, request_id, tokens))
            except ServiceUnavailableError as refusal:
                answer.set_exception(refusal)

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _plan(self, scopes: Sequence[LimitScope]) -> _Plan:
        """What a call over ``scopes`` sends, built once per scopes object (the admit step keeps
        one per key and model; `acquire` looks it up inline)."""
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        plan = self._plans[id(scopes)] = _Plan(scopes, self._prefix)
        return plan

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        self.settle_nowait(ticket, actual_tokens)
        batch = self._last  # the batch this settle went into, or a later one
        if batch is not None:
            # Shielded: a caller cancelled while it waits must not cancel the batch's future.
            await asyncio.shield(batch.replied())

    def settle_nowait(self, ticket: Ticket, actual_tokens: int) -> None:
        # Settled once; a no-op ticket or one of no scope (no wire) holds nothing.
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.noop or ticket.wire is None:
            return
        self._live.pop(ticket, None)  # no longer renewed
        delta = (actual_tokens if actual_tokens > 0 else 0) - ticket.tokens
        # The ticket's keys and scope counts in RESP, made by its plan: with the token
        # scopes (a delta to book) or without (leases only); its second and id in RESP.
        keys_by_delta, tail = ticket.wire
        keys, n_keys, counts = keys_by_delta[0 if delta else 1]
        if not n_keys:
            return
        batch = self._open
        if batch is None:
            batch = self._open = self._last = _Batch()
            asyncio.get_running_loop().call_soon(self._send)
        batch.settle_keys.append(keys)
        batch.n_settle_keys += n_keys
        encoded_delta = b"%d" % delta
        batch.settle_args += (counts, b"$%d\r\n%b\r\n" % (len(encoded_delta), encoded_delta), tail)
        batch.settles += 1
        if batch.settles >= _BATCH_MAX:
            self._send()

    async def close(self) -> None:
        """Send the calls still waiting and wait for their replies (bounded by the client's
        timeout); the Redis client belongs to the caller."""
        self._send()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._last is not None:  # replies are ordered: the last one answered means all
            await self._last.replied()
        await self.leases.close()

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
                 "settle_wire", "token_scopes")  # fmt: skip

    def __init__(self, scopes: Sequence[LimitScope], prefix: str) -> None:
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
        # A ticket's settle in RESP, (keys, their number, the two scope counts): with a
        # delta to book (token hashes, then lease sets) and without (lease sets only).
        token_keys = [prefix + name + ":t" for name in self.token_scopes]
        lease_keys = [prefix + name + ":p" for name in self.lease_scopes]
        self.settle_wire = (
            (bulks(*token_keys, *lease_keys), len(token_keys) + len(lease_keys),
             bulks(len(token_keys), len(lease_keys))),
            (bulks(*lease_keys), len(lease_keys), bulks(0, len(lease_keys))),
        )  # fmt: skip


class _Batch:
    """The calls of one event-loop turn: one script call for all. Keys and arguments are
    RESP bulk strings: the acquires' ``n_keys`` keys and ``n_args`` arguments, the
    ``settles`` tickets' ``n_settle_keys`` keys and arguments. ``done`` is made only for
    a caller that waits for the reply (`replied`)."""

    __slots__ = ("answers", "args", "done", "keys", "n_args", "n_keys", "n_settle_keys", "over",
                 "sent", "settle_args", "settle_keys", "settles")  # fmt: skip

    def __init__(self) -> None:
        # per request: its answer, its plan, request id and token estimate, and its id and
        # lease (ms) as RESP bulk strings
        self.answers: list[tuple[asyncio.Future[Admission], _Plan, str, int, bytes, bytes]] = []
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.n_keys = 0
        self.n_args = 0
        self.settle_keys: list[bytes] = []
        self.settle_args: list[bytes] = []
        self.n_settle_keys = 0
        self.settles = 0
        self.done: asyncio.Future[None] | None = None
        self.over = False  # the reply (or its failure) has arrived
        self.sent = False  # written to the connection: the script may have run

    def replied(self) -> asyncio.Future[None]:
        """Resolved once the call's reply (or its failure) has arrived (made on demand: a
        future per call costs, and most calls have nobody waiting for their reply)."""
        if self.done is None:
            self.done = asyncio.get_running_loop().create_future()
            if self.over:
                self.done.set_result(None)
        return self.done


def _unlimited(request_id: str, tokens: int, *, noop: bool = False) -> Admission:
    """An admission no scope limits (no scopes, or fail-open); its ticket settles as nothing."""
    ticket = Ticket(request_id, tokens=tokens, second=0, noop=noop)
    return build_admission(True, None, 0.0, (), (), 0.0, ticket)
