"""The Redis limiter's parallel-slot leases: renewed while their requests run, released
when an acquire's reply was lost.

A parallel slot is a member of a scope's lease set (``<scope>:p``, request id -> expiry in
ms on Redis's clock) that every acquire first purges of expired members. Leases are short
(``limits.redis_lease_seconds``, 30 s by default) so that a slot nobody will release (a
replica that died, a reply that never came back) frees itself soon; a request that runs
longer (a long stream) keeps its slot because this keeper renews it.

Renewal: the limiter registers each admitted ticket that holds a slot in ``live``, with its
lease (a dict insert at admission, a pop at settle: no I/O and no task per request). Every
third of the shortest lease seen, one task sends every live ticket's renewal to Redis, in
calls of up to ``_RENEW_CHUNK`` tickets: ``ZADD XX`` (a settled lease, already removed, is
not created again) at Redis's clock plus the ticket's lease. One failed renewal round is
harmless: the next comes a third of a lease later, before the lease runs out. A ticket
still live ``max_hold`` seconds after its admission (on Redis's clock; a settle that never
came: a bug) stops being renewed, so even then its slot is freed one lease later.

Lost replies: when an acquire's script call fails after it was written to the socket (a
timeout, or the connection lost), the script may have run and taken slots for requests
that were then answered by the failure mode. Each such request's release (``ZREM`` of its
id from its lease sets, as the limiter's settle does with no token delta) is queued and
sent by a task, retried with backoff until Redis answers again. Request ids are random
(server-made), so releasing an id never frees another request's slot. A queued release
whose lease has expired meanwhile is dropped: the slot has already freed itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sluice.pipeline.limits.base import Ticket
from sluice.pipeline.limits.wire import Sink, bulk

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_RENEW_CHUNK = 256  # leases per renewal call: bounds one call's run time in Redis
_RELEASE_CHUNK = 256  # releases per call
_MAX_RELEASES = 100_000  # queued releases kept while Redis is down (oldest dropped)
_RELEASE_RETRY_FIRST = 0.05  # seconds before the first try, doubled after each failure
_RELEASE_RETRY_MAX = 1.0
_ZERO = bulk(b"0")

Release = tuple[float, bytes, int, bytes]
"""A queued release: (deadline on the loop's clock, lease-set keys in RESP, their number,
the script's settle arguments in RESP)."""


class _Script(Protocol):
    """A registered script (`wire.Script`), sent without awaiting."""

    def send(self, keys: int, items: int, body: bytes, sink: Sink) -> bool: ...


class _RenewCall:
    """One renewal script call being built: groups of (lease sets, members) (lua.py)."""

    def __init__(self, lease: bytes = b"") -> None:
        self.lease = lease
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.n_keys = 0
        self.members = 0

    def add(self, lease_keys: bytes, n: int, rids: list[bytes]) -> None:
        self.keys.append(lease_keys)
        self.n_keys += n
        self.args += (bulk(b"%d" % n), bulk(b"%d" % len(rids)), *rids)
        self.members += len(rids)

    def send(self, keeper: LeaseKeeper) -> list[asyncio.Future[Any]]:
        if not self.members:
            return []
        body = b"".join((*self.keys, self.lease, *self.args))
        items = self.n_keys + 1 + len(self.args)
        return [keeper._send(keeper._renew_script, self.n_keys, items, body)]


class LeaseKeeper:
    """Renews the live tickets' leases; sends the releases of lost replies."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[None]],
        renew_script: _Script,
        limiter_script: _Script,
        *,
        on_failure: Callable[[Exception], None],
        max_hold: float = 3600.0,
    ) -> None:
        self.live: dict[Ticket, bytes] = {}  # ticket -> its lease in ms, in RESP
        self._shortest = self._longest = 0.0  # the leases seen (`saw`), in seconds
        self._redis_now = 0  # Redis's clock (s) at the last renewal
        self._connect = connect
        self._renew_script = renew_script
        self._limiter_script = limiter_script
        self._on_failure = on_failure
        self._max_hold = max_hold
        self._renewer: asyncio.Task[None] | None = None
        self._releases: deque[Release] = deque(maxlen=_MAX_RELEASES)
        self._releaser: asyncio.Task[None] | None = None
        self._closed = False

    def saw(self, lease_seconds: float) -> None:
        """The limiter's acquires use this lease (called when it changes: rarely)."""
        if not self._shortest or lease_seconds < self._shortest:
            self._shortest = lease_seconds
        self._longest = max(self._longest, lease_seconds)

    def start(self) -> None:
        """Start the renewal task (the limiter calls this once it holds a live ticket)."""
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="sluice-lease-renewal"
            )

    @property
    def running(self) -> bool:
        return self._renewer is not None

    async def close(self) -> None:
        """Stop renewing; send the queued releases once (bounded by the client's timeout)."""
        self._closed = True
        for task in (self._renewer, self._releaser):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._renewer = self._releaser = None
        while self._releases:
            try:
                await self._release_some()
            except _FAILURES as exc:
                self._on_failure(exc)
                break
        self.live.clear()

    # Renewal

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._shortest / 3)
            if self.live:
                try:
                    await self.renew()
                except _FAILURES as exc:  # the next round comes before the leases run out
                    self._on_failure(exc)

    async def renew(self) -> None:
        """Renew every live ticket's lease now (the renewal task's round; tests call it)."""
        self._drop_overdue()
        # Grouped by lease and lease sets (a plan's: the tickets of one key and model share
        # one bytes object), so a lease set takes one ZADD for all its members.
        groups: dict[tuple[bytes, bytes], tuple[int, list[bytes]]] = {}
        for ticket, lease in self.live.items():
            lease_keys, n, _ = ticket.wire[0][1]
            group = groups.get((lease, lease_keys))
            if group is None:
                group = groups[(lease, lease_keys)] = (n, [])
            group[1].append(bulk(ticket.request_id.encode()))
        replies: list[asyncio.Future[Any]] = []
        call = _RenewCall()
        for (lease, lease_keys), (n, rids) in groups.items():
            for i in range(0, len(rids), _RENEW_CHUNK):
                if call.lease != lease or call.members >= _RENEW_CHUNK:
                    replies += call.send(self)
                    call = _RenewCall(lease)
                call.add(lease_keys, n, rids[i : i + _RENEW_CHUNK])
        # All calls are written at once, before any settle queued later: the order on the
        # connection is the order here (and ZADD XX never brings back a settled lease).
        replies += call.send(self)
        for now_ms in await asyncio.gather(*replies):
            self._redis_now = max(self._redis_now, int(now_ms) // 1000)

    def _drop_overdue(self) -> None:
        if not self._redis_now:
            return
        oldest = self._redis_now - self._max_hold
        for ticket in [ticket for ticket in self.live if ticket.second < oldest]:
            del self.live[ticket]

    # Releases of lost replies

    def lost(self, leases: Iterable[tuple[bytes, int, bytes, bytes]]) -> None:
        """Queue the release of each (lease-set keys, their number, (0, number) counts,
        request id), all in RESP: requests whose acquire may have run though its reply was
        lost."""
        deadline = asyncio.get_running_loop().time() + self._longest
        for keys, n, counts, rid in leases:
            self._releases.append((deadline, keys, n, counts + _ZERO + _ZERO + rid))
        if self._releases and self._releaser is None and not self._closed:
            self._releaser = asyncio.get_running_loop().create_task(
                self._release_until_done(), name="sluice-lease-release"
            )

    @property
    def releases_queued(self) -> int:
        return len(self._releases)

    async def _release_until_done(self) -> None:
        delay = _RELEASE_RETRY_FIRST
        try:
            while self._releases:
                await asyncio.sleep(delay)
                try:
                    await self._release_some()
                    delay = _RELEASE_RETRY_FIRST
                except _FAILURES as exc:
                    self._on_failure(exc)
                    delay = min(delay * 2, _RELEASE_RETRY_MAX)
        finally:
            self._releaser = None

    async def _release_some(self) -> None:
        """One script call releasing up to ``_RELEASE_CHUNK`` queued leases: the limiter's
        script with that many settles of no token delta and no acquire (lua.py). Taken off
        the queue first and put back if the call fails."""
        now = asyncio.get_running_loop().time()
        releases = self._releases
        while releases and releases[0][0] <= now:  # expired on their own meanwhile
            releases.popleft()
        taken = [releases.popleft() for _ in range(min(len(releases), _RELEASE_CHUNK))]
        if not taken:
            return
        n_keys = sum(n for _, _, n, _ in taken)
        body = b"".join(
            (*(keys for _, keys, _, _ in taken), bulk(b"%d" % len(taken)),
             *(args for _, _, _, args in taken), _ZERO)
        )  # fmt: skip
        try:
            await self._send(self._limiter_script, n_keys, n_keys + 2 + 5 * len(taken), body)
        except BaseException:
            releases.extendleft(reversed(taken))
            raise

    def _send(self, script: _Script, keys: int, items: int, body: bytes) -> asyncio.Future[Any]:
        """Send one script call now when a connection is open (else once one is); the
        returned future has its reply, or raises its failure."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()

        def sink(value: Any) -> None:
            if reply.done():
                return
            if isinstance(value, BaseException):
                reply.set_exception(value)
            else:
                reply.set_result(value)

        if not script.send(keys, items, body, sink):

            async def connect_and_send() -> Any:
                await self._connect()
                if not script.send(keys, items, body, sink):
                    raise RedisConnectionError("Redis connection lost as it opened")
                return await reply

            return asyncio.ensure_future(connect_and_send())
        return reply
