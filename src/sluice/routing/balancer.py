"""The order in which a request tries a model's deployments.

The policy (`ModelSettings.balancing`) picks the first; the others follow by the policy's
cost, cheapest first, for retries elsewhere. Deployments out of rotation (ejected, cooling
after a 429, half-open with its probes taken) are left out, but never all of them: when all
are out, the one back soonest stays. A deployment at its concurrency cap goes behind those
under theirs. Policies:

- ``weighted``: random in proportion to the weights;
- ``least_outstanding``: the power of two choices: two drawn at random by weight, the one
  with fewer attempts under way per unit of weight wins;
- ``latency``: the same two draws, compared by the smoothed time to first byte times the
  attempts under way (plus one), per unit of weight. A deployment with no recent samples is
  assumed as fast as the fastest known, so new and recovered ones get traffic; the
  outstanding factor stops it taking everything while its first answers are awaited.

See docs/resilience.md, "Balancing and health".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from sluice.routing.deployment import Deployment
from sluice.routing.health import Clock
from sluice.routing.settings import Balancing

Cost = Callable[[Deployment], float]

_UNKNOWN_LATENCY = 1.0  # any constant: it only matters that every deployment gets the same


class Policy(Protocol):
    def costs(self, deployments: Sequence[Deployment], now: float) -> Cost:
        """How expensive each deployment is now (lower is better)."""

    def choose(self, group: Sequence[Deployment], rng: random.Random, cost: Cost) -> Deployment:
        """The first deployment to try among ``group`` (never empty)."""


class Weighted:
    def costs(self, deployments: Sequence[Deployment], now: float) -> Cost:
        return _heaviest_first

    def choose(self, group: Sequence[Deployment], rng: random.Random, cost: Cost) -> Deployment:
        return draw(group, rng)


class LeastOutstanding:
    def costs(self, deployments: Sequence[Deployment], now: float) -> Cost:
        return _load

    def choose(self, group: Sequence[Deployment], rng: random.Random, cost: Cost) -> Deployment:
        return two_choices(group, rng, cost)


class Latency:
    def costs(self, deployments: Sequence[Deployment], now: float) -> Cost:
        known = [
            latency
            for d in deployments
            if d.health is not None and (latency := d.health.latency(now)) is not None
        ]
        prior = min(known) if known else _UNKNOWN_LATENCY

        def cost(d: Deployment) -> float:
            latency = d.health.latency(now) if d.health is not None else None
            return (prior if latency is None else latency) * _load(d)

        return cost

    def choose(self, group: Sequence[Deployment], rng: random.Random, cost: Cost) -> Deployment:
        return two_choices(group, rng, cost)


POLICIES: dict[Balancing, Callable[[], Policy]] = {
    "weighted": Weighted,
    "least_outstanding": LeastOutstanding,
    "latency": Latency,
}


class Balancer:
    """Orders the deployments of one model with more than one (`ModelRoute.order`)."""

    def __init__(self, deployments: list[Deployment], policy: Policy, clock: Clock) -> None:
        self._deployments = deployments
        self._policy = policy
        self._clock = clock

    def order(self, rng: random.Random) -> list[Deployment]:
        now = self._clock()
        ready: list[Deployment] = []
        full: list[Deployment] = []
        soonest: Deployment | None = None
        soonest_at = 0.0
        for d in self._deployments:
            health = d.health
            if health is not None and not health.available(now):
                back = health.back_at(now)
                if soonest is None or back < soonest_at:
                    soonest, soonest_at = d, back
                continue
            cap = d.max_concurrency
            (full if cap is not None and d.outstanding >= cap else ready).append(d)
        group = ready or full
        if not group:
            assert soonest is not None
            return [soonest]
        cost = self._policy.costs(self._deployments, now)
        first = self._policy.choose(group, rng, cost)
        order = [first, *sorted((d for d in group if d is not first), key=cost)]
        if ready and full:
            order += sorted(full, key=cost)
        return order


def draw(
    group: Sequence[Deployment], rng: random.Random, skip: Deployment | None = None
) -> Deployment:
    """One deployment at random in proportion to its weight (``skip`` left out)."""
    total = sum(d.weight for d in group if d is not skip)
    point = rng.random() * total
    chosen = group[0]
    for d in group:
        if d is skip:
            continue
        chosen = d
        point -= d.weight
        if point < 0:
            break
    return chosen


def two_choices(group: Sequence[Deployment], rng: random.Random, cost: Cost) -> Deployment:
    """The cheaper of two distinct deployments drawn by weight (the first on a tie)."""
    if len(group) == 1:
        return group[0]
    first = draw(group, rng)
    second = draw(group, rng, skip=first)
    return second if cost(second) < cost(first) else first


def _load(d: Deployment) -> float:
    return (d.outstanding + 1) / d.weight


def _heaviest_first(d: Deployment) -> float:
    return -d.weight
