"""The order of a model's deployments for a request (`sluice.routing.balancer`): each
policy's choice, what is left out, and the one-deployment path that costs nothing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sluice.routing.balancer import POLICIES, Balancer
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.plan import ModelRoute
from sluice.routing.settings import Balancing
from tests.routing.fakes import FakeClock, deployments, health

DRAWS = 20_000


def balancer(policy: Balancing, group: list[Deployment], clock: FakeClock) -> Balancer:
    return Balancer(group, POLICIES[policy](), clock)


def first_picks(b: Balancer, seed: int = 7, draws: int = DRAWS) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(b.order(rng)[0].id for _ in range(draws))


def with_latency(d: Deployment, seconds: float) -> None:
    d.begin()
    d.end(Outcome.OK, seconds)


def test_weighted_choice_follows_the_weights() -> None:
    clock = FakeClock()
    group = deployments(clock, count=3, weights=[6, 3, 1])
    picks = first_picks(balancer("weighted", group, clock))
    assert picks["d0"] / DRAWS == pytest.approx(0.6, abs=0.015)
    assert picks["d1"] / DRAWS == pytest.approx(0.3, abs=0.015)
    assert picks["d2"] / DRAWS == pytest.approx(0.1, abs=0.015)


def test_every_available_deployment_is_in_the_order_once() -> None:
    clock = FakeClock()
    group = deployments(clock, count=4, weights=[1, 4, 2, 3])
    rng = random.Random(1)
    for policy in POLICIES:
        for _ in range(50):
            order = balancer(policy, group, clock).order(rng)
            assert sorted(d.id for d in order) == ["d0", "d1", "d2", "d3"]
    # The weighted policy's fallbacks: heaviest first.
    order = balancer("weighted", group, clock).order(rng)
    assert [d.id for d in order[1:]] == [d for d in ["d1", "d3", "d2", "d0"] if d != order[0].id]


def test_two_choices_prefer_the_less_loaded() -> None:
    clock = FakeClock()
    group = deployments(clock, count=2)
    group[0].outstanding = 5
    picks = first_picks(balancer("least_outstanding", group, clock), draws=1000)
    assert picks == {"d1": 1000}
    three = deployments(clock, count=3)
    three[0].outstanding, three[1].outstanding, three[2].outstanding = 9, 1, 0
    b = balancer("least_outstanding", three, clock)
    picks = first_picks(b)
    assert "d0" not in picks  # the most loaded loses every pair it is drawn into
    assert picks["d2"] > picks["d1"] * 1.5
    assert [d.id for d in b.order(random.Random(3))[1:]][-1] == "d0"


def test_two_choices_draw_by_weight() -> None:
    clock = FakeClock()
    group = deployments(clock, count=3, weights=[8, 1, 1])
    picks = first_picks(balancer("least_outstanding", group, clock))
    # Equal load: the pair is drawn by weight, and load per weight favours the heavy one.
    assert picks["d0"] / DRAWS > 0.9
    group[0].outstanding = 30  # 31/8 against 1/1: the light ones win when it is drawn
    picks = first_picks(balancer("least_outstanding", group, clock))
    assert picks["d0"] == 0
    assert picks["d1"] == pytest.approx(picks["d2"], rel=0.1)


def test_latency_prefers_the_faster_until_it_is_loaded() -> None:
    clock = FakeClock()
    fast, slow = deployments(clock, count=2)
    with_latency(fast, 0.1)
    with_latency(slow, 1.0)
    b = balancer("latency", [fast, slow], clock)
    assert first_picks(b, draws=500) == {"d0": 500}
    fast.outstanding = 10  # 0.1 * 11 against 1.0 * 1
    assert first_picks(b, draws=500) == {"d1": 500}


def test_latency_gives_a_deployment_without_samples_the_best_known_speed() -> None:
    clock = FakeClock()
    known, new = deployments(clock, count=2)
    with_latency(known, 0.2)
    b = balancer("latency", [known, new], clock)
    assert b.order(random.Random(0))  # no error without a sample
    picks = first_picks(b, draws=2000)
    assert picks["d1"] / 2000 == pytest.approx(0.5, abs=0.05)
    new.outstanding = 1  # awaiting its first answer: the penalty moves traffic back
    assert first_picks(b, draws=500) == {"d0": 500}


def test_ejected_and_cooling_deployments_are_left_out() -> None:
    clock = FakeClock()
    group = deployments(clock, count=3, consecutive_failures=1, max_ejected_percent=50)
    group[0].begin()
    group[0].end(Outcome.FAILED, None)
    group[1].begin()
    group[1].end(Outcome.THROTTLED, None, 2.0)
    for policy in POLICIES:
        b = balancer(policy, group, clock)
        assert [d.id for d in b.order(random.Random(0))] == ["d2"]
    clock.advance(2)
    assert {d.id for d in balancer("weighted", group, clock).order(random.Random(0))} == {
        "d1",
        "d2",
    }


def test_when_all_are_out_the_one_back_soonest_stays() -> None:
    clock = FakeClock()
    group = deployments(clock, count=3, consecutive_failures=1)
    group[0].begin()
    group[0].end(Outcome.FAILED, None)  # ejected for 5 s
    for d, seconds in ((group[1], 4.0), (group[2], 9.0)):
        d.begin()
        d.end(Outcome.THROTTLED, None, seconds)
    b = balancer("least_outstanding", group, clock)
    assert [d.id for d in b.order(random.Random(0))] == ["d1"]
    group[1].begin()
    group[1].end(Outcome.THROTTLED, None, 8.0)
    assert [d.id for d in b.order(random.Random(0))] == ["d0"]


def test_a_half_open_deployment_with_its_probes_taken_is_left_out() -> None:
    clock = FakeClock()
    group = deployments(clock, count=2, consecutive_failures=1, half_open_probes=1)
    group[0].begin()
    group[0].end(Outcome.FAILED, None)
    clock.now = health(group[0]).ejected_until
    b = balancer("weighted", group, clock)
    assert {d.id for d in b.order(random.Random(0))} == {"d0", "d1"}
    group[0].begin()  # the probe
    assert [d.id for d in b.order(random.Random(0))] == ["d1"]


def test_a_deployment_at_its_cap_goes_to_the_back() -> None:
    clock = FakeClock()
    group = deployments(clock, count=3, weights=[100, 1, 1], max_concurrency=2)
    group[0].outstanding = 2
    for policy in POLICIES:
        b = balancer(policy, group, clock)
        for seed in range(20):
            assert b.order(random.Random(seed))[-1].id == "d0"
    for d in group:
        d.outstanding = 2  # all at the cap: still all there, chosen by the policy
    assert len(balancer("weighted", group, clock).order(random.Random(0))) == 3


def test_one_deployment_costs_nothing() -> None:
    clock = FakeClock()
    [only] = deployments(clock, count=1)
    route = ModelRoute("m", [only])
    only.begin()
    only.end(Outcome.THROTTLED, None, 30.0)  # cooling: it is still the only one to try
    assert route.balancer is None
    assert route.order(random.Random(0)) is route.deployments


def test_a_route_without_a_balancer_chooses_by_weight() -> None:
    route = ModelRoute("m", deployments(FakeClock(), count=2, weights=[3, 1]))
    rng = random.Random(5)
    picks = Counter(route.order(rng)[0].id for _ in range(DRAWS))
    assert picks["d0"] / DRAWS == pytest.approx(0.75, abs=0.015)
