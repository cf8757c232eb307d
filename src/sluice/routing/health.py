"""Passive outlier detection for one deployment, and its model's cap on ejections.

A deployment is *closed* (serving), *ejected* (left out of plans until a time), or
*half-open* (its ejection ended: a few requests at once test it; a success closes it, a
failure ejects it again for longer). It is ejected by ``consecutive_failures`` failures in
a row, or over the last ``window`` seconds (once ``min_requests`` came) by a failure share
of ``error_rate`` or a slow-call share of ``slow_rate``. The n-th ejection in a row lasts
``ejection_base * 2^(n-1)`` seconds, at most ``ejection_max``; n steps back by one for each
stretch as long as the last ejection that the deployment then serves without one. A model
never has more than ``max_ejected_percent`` of its deployments out at once, and never all.

An upstream 429 is back-pressure, not a failure: the deployment *cools* for its
Retry-After and is left out of plans meanwhile, without touching its health.

Every decision is taken when an attempt ends or a plan is made, against an injected clock:
there are no timers. See docs/resilience.md, "Balancing and health".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

from sluice.routing.deployment import Outcome
from sluice.routing.settings import HealthSettings

Clock = Callable[[], float]

DEFAULT_COOLING = 1.0
"""Seconds a 429 without a usable Retry-After cools its deployment."""
MAX_COOLING = 60.0
"""The longest cooling an upstream's Retry-After can ask for."""
FORGET_LATENCY_AFTER = 60.0
"""Seconds without a sample after which a latency estimate is forgotten, so that a
deployment that was slow once gets traffic again and can show it recovered."""
_EWMA_ALPHA = 0.1  # weight of a new time-to-first-byte sample
_BUCKETS = 10  # the window is counted in this many slices


class State(enum.Enum):
    CLOSED = "closed"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"


class EjectionPool:
    """The deployments of one model: how many of them may be out at once."""

    def __init__(self, max_ejected_percent: float) -> None:
        self._percent = max_ejected_percent
        self.members: list[DeploymentHealth] = []

    def may_eject(self) -> bool:
        """Whether one more member may be ejected now (half-open ones still count as out:
        they have not yet shown that they serve again)."""
        size = len(self.members)
        if self._percent <= 0 or size < 2:
            return False
        allowed = min(size - 1, max(1, math.floor(size * self._percent / 100)))
        out = sum(member.state is not State.CLOSED for member in self.members)
        return out < allowed


class DeploymentHealth:
    """One deployment's health, fed by `begin` and `end` around every attempt."""

    def __init__(
        self,
        settings: HealthSettings,
        pool: EjectionPool,
        clock: Clock,
        on_eject: Callable[[str, float], object] | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._clock = clock
        self._on_eject = on_eject
        pool.members.append(self)
        self.state = State.CLOSED
        self.ejected_until = 0.0
        self.cooled_until = 0.0
        self.ejections = 0
        """Ejections in the current streak (decays while the deployment stays healthy)."""
        self._healthy_since = 0.0
        self._probes = 0
        self._consecutive = 0
        self._slice = settings.window / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._slow = [0] * _BUCKETS
        self._tick = 0  # the slice index (time // slice) the counters end at
        self.ttfb_ewma: float | None = None
        """Seconds to the first response byte, smoothed (None: no recent sample)."""
        self._ttfb_at = 0.0

    def move_to(self, pool: EjectionPool) -> None:
        """Join the ejection pool of a rebuilt model table (a reload that kept this
        deployment): its state goes on, counted against its model's new deployments."""
        self._pool = pool
        pool.members.append(self)

    # -- the request path --------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Whether a plan made now may include the deployment."""
        if now < self.cooled_until:
            return False
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.EJECTED:
            if now < self.ejected_until:
                return False
            self._half_open()
        return self._probes < self._settings.half_open_probes

    def back_at(self, now: float) -> float:
        """When the deployment is available again (``now`` if it is, or if it is only
        half-open and busy): what "least bad" means when every deployment is out."""
        back = max(now, self.cooled_until)
        if self.state is State.EJECTED:
            back = max(back, self.ejected_until)
        return back

    def begin(self) -> None:
        if self.state is not State.CLOSED:
            if self.state is State.EJECTED and self._clock() >= self.ejected_until:
                self._half_open()
            if self.state is State.HALF_OPEN:
                self._probes += 1

    def end(
        self, outcome: Outcome, first_byte_s: float | None, retry_after_s: float | None
    ) -> None:
        now = self._clock()
        if self.state is State.HALF_OPEN and self._probes > 0:
            self._probes -= 1
        if outcome is Outcome.THROTTLED:
            self._cool(now, retry_after_s)
            return
        if outcome is Outcome.NO_VERDICT:
            return
        slow = first_byte_s is not None and first_byte_s > self._settings.slow_call_seconds
        if outcome is Outcome.OK and first_byte_s is not None:
            self._sample_ttfb(now, first_byte_s)
        self._judge(now, outcome is Outcome.OK, slow)

    def probed(self, ok: bool) -> None:
        """An active probe's result: like an attempt's, without a latency sample."""
        self._judge(self._clock(), ok, False)

    def latency(self, now: float) -> float | None:
        """The smoothed time to first byte, or None when unknown or forgotten."""
        if self.ttfb_ewma is None or now - self._ttfb_at > FORGET_LATENCY_AFTER:
            return None
        return self.ttfb_ewma

    # -- decisions ---------------------------------------------------------------------

    def _judge(self, now: float, ok: bool, slow: bool) -> None:
        state = self.state
        if state is State.EJECTED:
            if now < self.ejected_until:
                return  # the least bad of a model all out: its ejection runs its course
            self._half_open()
            state = State.HALF_OPEN
        if state is State.HALF_OPEN:
            if ok and not slow:
                self._close(now)
            else:
                self._eject(now, "half_open")
            return
        self._count(now, ok, slow)
        if ok:
            self._consecutive = 0
            if not slow:
                return
        else:
            self._consecutive += 1
            if self._consecutive >= self._settings.consecutive_failures:
                self._eject(now, "consecutive")
                return
        calls = sum(self._calls)
        if calls < self._settings.min_requests:
            return
        if not ok and sum(self._failures) >= self._settings.error_rate * calls:
            self._eject(now, "error_rate")
        elif slow and sum(self._slow) >= self._settings.slow_rate * calls:
            self._eject(now, "slow_rate")

    def _eject(self, now: float, reason: str) -> None:
        if self.state is State.CLOSED and not self._pool.may_eject():
            return  # the model has as many out as it may: this one keeps serving
        n = self.ejections
        if self.state is State.CLOSED:
            # A healthy stretch as long as an ejection earns one step back.
            since = self._healthy_since
            while n > 0 and now - since >= self._duration(n):
                since += self._duration(n)
                n -= 1
        n += 1
        self.ejections = n
        self.state = State.EJECTED
        seconds = self._duration(n)
        self.ejected_until = now + seconds
        self._probes = 0
        self._reset_counts()
        if self._on_eject is not None:
            self._on_eject(reason, seconds)

    def _duration(self, n: int) -> float:
        settings = self._settings
        return min(settings.ejection_max, settings.ejection_base * 2.0 ** min(n - 1, 64))

    def _half_open(self) -> None:
        self.state = State.HALF_OPEN
        self._probes = 0

    def _close(self, now: float) -> None:
        self.state = State.CLOSED
        self._healthy_since = now
        self._reset_counts()

    def _cool(self, now: float, retry_after_s: float | None) -> None:
        seconds = retry_after_s if retry_after_s is not None and retry_after_s > 0 else None
        cooling = min(MAX_COOLING, seconds if seconds is not None else DEFAULT_COOLING)
        self.cooled_until = max(self.cooled_until, now + cooling)

    def _sample_ttfb(self, now: float, seconds: float) -> None:
        previous = self.latency(now)
        self.ttfb_ewma = (
            seconds if previous is None else previous + _EWMA_ALPHA * (seconds - previous)
        )
        self._ttfb_at = now

    # -- the sliding window ------------------------------------------------------------

    def _count(self, now: float, ok: bool, slow: bool) -> None:
        tick = int(now / self._slice)
        if tick != self._tick:
            self._advance(tick)
        index = tick % _BUCKETS
        self._calls[index] += 1
        if not ok:
            self._failures[index] += 1
        if slow:
            self._slow[index] += 1

    def _advance(self, tick: int) -> None:
        """Move the window's end to slice ``tick``, emptying the slices it passes."""
        for passed in range(self._tick + 1, min(tick, self._tick + _BUCKETS) + 1):
            index = passed % _BUCKETS
            self._calls[index] = self._failures[index] = self._slow[index] = 0
        if tick < self._tick:  # the clock went back: start afresh rather than guess
            self._reset_counts()
        self._tick = tick

    def _reset_counts(self) -> None:
        self._consecutive = 0
        for counts in (self._calls, self._failures, self._slow):
            counts[:] = [0] * _BUCKETS
