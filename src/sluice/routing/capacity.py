"""Load shedding: each deployment's concurrency cap with a bounded queue in front of it, one
bound on everything waiting in the process, and a share of both kept for priority keys.

A request takes one of its deployment's slots for the length of its attempt (a stream's
until it closes). With a slot free it goes on at once: `Capacity.take` is a comparison and
an increment, no coroutine, no clock. Otherwise it waits in the deployment's queue, first
come first served, keys with ``priority > 0`` (the high class) ahead of everyone else,
and is refused with `DeploymentBusyError` (503, ``Retry-After``) the moment it cannot be
served in time:

* ``queue_full``: the deployment's queue (``deployment_max_waiting``) or the process's
  (``max_waiting``) is full;
* ``wait_timeout``: at ``max_wait`` in the queue, or at once when the queue ahead drains too
  slowly to reach it within ``max_wait`` (measured while the queue is busy);
* ``reserved``: ``reserved_share`` of every cap and queue is kept for the high class; a
  low-class request refused where a high-class one would have got in gets 429
  (`ReservedCapacityError`, still "busy" to the attempts step, which tries the next
  candidate).

Slots, queues and counts are per process (docs/resilience.md, "Load shedding").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from sluice.errors import DeploymentBusyError, ReservedCapacityError
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.settings import QueueSettings

QUEUE_FULL = "queue_full"
WAIT_TIMEOUT = "wait_timeout"
RESERVED = "reserved"
REASONS = (QUEUE_FULL, WAIT_TIMEOUT, RESERVED)

_GAP_WEIGHT = 0.2
"""Weight of the newest gap between two hand-offs in their moving average."""


def _open_part(bound: int, reserved_share: float) -> int:
    """What the low class may use of ``bound``: the reserved part is rounded down."""
    return bound - int(bound * reserved_share)


class WaitingRoom:
    """The count of requests waiting for any deployment in this process, and its bounds."""

    __slots__ = ("limit", "open_limit", "waiting")

    def __init__(self, limit: int, reserved_share: float) -> None:
        self.limit = limit
        self.open_limit = _open_part(limit, reserved_share)
        self.waiting = 0


class Capacity:
    """One deployment's slots and the queue in front of them."""

    __slots__ = (
        "_clock",
        "_gap",
        "_high",
        "_last_hand_off",
        "_low",
        "_max_wait",
        "_max_waiting",
        "_open_limit",
        "_open_waiting",
        "_room",
        "_shed",
        "_wait_seconds",
        "_waiting_gauge",
        "active",
        "limit",
        "model",
        "name",
        "waiting",
    )

    def __init__(
        self,
        model: str,
        name: str,
        limit: int,
        settings: QueueSettings,
        room: WaitingRoom,
        metrics: GatewayMetrics,
        *,
        reserved_share: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.name = name
        self.limit = limit
        self.active = 0
        """Slots taken."""
        self.waiting = 0
        """Requests in this deployment's queue."""
        self._open_limit = _open_part(limit, reserved_share)
        self._max_waiting = settings.deployment_max_waiting
        self._open_waiting = _open_part(settings.deployment_max_waiting, reserved_share)
        self._max_wait = settings.max_wait
        self._room = room
        self._clock = clock
        self._high: deque[asyncio.Future[None]] = deque()
        self._low: deque[asyncio.Future[None]] = deque()
        self._last_hand_off: float | None = None
        self._gap: float | None = None
        """Moving average of the time between two hand-offs while the queue is busy: the
        time one more request ahead adds to a wait. None until measured."""
        self._shed = {reason: metrics.shed.labels(model, name, reason) for reason in REASONS}
        self._wait_seconds = metrics.queue_wait.labels(model, name)
        self._waiting_gauge = metrics.queue_waiting.labels(model, name)

    def take(self, high: bool) -> bool:
        """Take a free slot now, if the caller's class may; False sends it to `wait`.

        Waiters exist only while every slot their class may use is taken (a release hands
        its slot straight to the next), so a free slot here is never one owed to a waiter.
        """
        if self.active < (self.limit if high else self._open_limit):
            self.active += 1
            return True
        return False

    async def wait(self, high: bool) -> None:
        """Queue for a slot; raises `DeploymentBusyError` at once when the request cannot be
        served in time, or at ``max_wait``. On return the caller holds a slot."""
        if not self.waiting:  # a new busy spell: rates measured in an old one are stale
            self._last_hand_off = self._gap = None
        refusal = self._refusal(high)
        if refusal is not None:
            raise self._refuse(refusal)
        loop = asyncio.get_running_loop()
        queue = self._high if high else self._low
        waiter: asyncio.Future[None] = loop.create_future()
        queue.append(waiter)
        self._count(1)
        timer = loop.call_later(self._max_wait, self._expire, queue, waiter)
        started = self._clock()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot just as the caller left: pass it on
            else:
                self._leave(queue, waiter)
            raise
        finally:
            timer.cancel()
            self._wait_seconds.observe(self._clock() - started)

    def release(self) -> None:
        """Give a slot back: to the first waiter that may use it, else free."""
        self.active -= 1
        if self.waiting:
            self._hand_off()

    def retry_after(self) -> int:
        """Seconds until the queue as it stands has drained, from the measured rate, within
        1..``max_wait``; 1 when no rate is known."""
        if self._gap is None:
            return 1
        estimate = math.ceil((self.waiting + 1) * self._gap)
        return max(1, min(estimate, math.ceil(self._max_wait)))

    def _refusal(self, high: bool) -> str | None:
        room = self._room
        full = self.waiting >= self._max_waiting or room.waiting >= room.limit
        if high:
            if full:
                return QUEUE_FULL
            ahead = len(self._high)
        else:
            if self.waiting >= self._open_waiting or room.waiting >= room.open_limit:
                # Refused where a high-class request would have got a slot or a place.
                return RESERVED if self.active < self.limit or not full else QUEUE_FULL
            ahead = self.waiting
        if self._gap is not None and (ahead + 1) * self._gap > self._max_wait:
            return WAIT_TIMEOUT
        return None

    def _refuse(self, reason: str) -> DeploymentBusyError:
        self._shed[reason].inc()
        headers = {"Retry-After": str(self.retry_after())}
        if reason == RESERVED:
            return ReservedCapacityError(
                f"Model '{self.model}' is busy: deployment {self.name}'s remaining capacity "
                "is reserved for priority keys.",
                headers=headers,
            )
        if reason == QUEUE_FULL:
            why = "its queue is full"
        else:
            why = f"a request cannot be served within {self._max_wait:g} s"
        return DeploymentBusyError(
            f"Model '{self.model}' is busy: deployment {self.name} has {self.limit} requests "
            f"in flight and {why}.",
            headers=headers,
        )

    def _hand_off(self) -> None:
        for queue, limit in ((self._high, self.limit), (self._low, self._open_limit)):
            while queue and self.active < limit:
                waiter = queue.popleft()
                self._count(-1)
                if waiter.done():  # cancelled: its caller is leaving
                    continue
                self.active += 1
                waiter.set_result(None)
                self._measure()
                return

    def _measure(self) -> None:
        now = self._clock()
        if self._last_hand_off is not None:
            gap = now - self._last_hand_off
            self._gap = gap if self._gap is None else self._gap + _GAP_WEIGHT * (gap - self._gap)
        self._last_hand_off = now

    def _expire(self, queue: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._leave(queue, waiter)
        waiter.set_exception(self._refuse(WAIT_TIMEOUT))

    def _leave(self, queue: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        """Take ``waiter`` out of ``queue`` unless a hand-off already did (and counted it)."""
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self._count(-1)

    def _count(self, change: int) -> None:
        self.waiting += change
        self._room.waiting += change
        self._waiting_gauge.set(self.waiting)


class LoadShedding:
    """Builds each deployment's `Capacity` around the process's one `WaitingRoom`.

    Without keys (no ``auth.master_key``) every request is in the low class, so nothing is
    reserved: a reserve for a class that cannot exist would only shrink every cap.
    """

    def __init__(
        self,
        settings: QueueSettings,
        metrics: GatewayMetrics,
        *,
        priorities: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._reserved_share = settings.reserved_share if priorities else 0.0
        self._clock = clock
        self.room = WaitingRoom(settings.max_waiting, self._reserved_share)

    def capacity(self, model: str, deployment: str, limit: int | None) -> Capacity | None:
        """The slots of one deployment; None for one without a cap here (a local engine
        queues and refuses for itself)."""
        if limit is None:
            return None
        return Capacity(
            model,
            deployment,
            limit,
            self._settings,
            self.room,
            self._metrics,
            reserved_share=self._reserved_share,
            clock=self._clock,
        )
