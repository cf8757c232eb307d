"""Outlier detection per deployment: ejection, its growth and cap, half-open probes, 429
cooling (`sluice.routing.health`), all against a fake clock."""

from __future__ import annotations

import pytest

from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.health import MAX_COOLING, State
from tests.routing.fakes import FakeClock, deployments, health


def attempt(d: Deployment, outcome: Outcome, first_byte: float | None = 0.1, **kw: float) -> None:
    d.begin()
    d.end(outcome, first_byte if outcome is Outcome.OK else None, kw.get("retry_after"))


def fail(d: Deployment, times: int = 1) -> None:
    for _ in range(times):
        attempt(d, Outcome.FAILED)


def succeed(d: Deployment, times: int = 1, first_byte: float = 0.1) -> None:
    for _ in range(times):
        attempt(d, Outcome.OK, first_byte)


def sit_out(clock: FakeClock, d: Deployment) -> None:
    """Let the ejection end: the deployment is half-open, its probe may go."""
    clock.now = health(d).ejected_until
    assert health(d).available(clock.now)
    assert health(d).state is State.HALF_OPEN


def test_consecutive_failures_eject_for_the_base_time_then_half_open() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=3, ejection_base=5)
    fail(d, 2)
    assert health(d).state is State.CLOSED
    fail(d)
    assert health(d).state is State.EJECTED
    assert not health(d).available(clock.now)
    clock.advance(4.9)
    assert not health(d).available(clock.now)
    clock.advance(0.1)
    assert health(d).available(clock.now)
    assert health(d).state is State.HALF_OPEN
    assert d.outstanding == 0


def test_a_success_resets_the_consecutive_count() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=3, min_requests=100)
    for _ in range(10):
        fail(d, 2)
        succeed(d)
    assert health(d).state is State.CLOSED


def test_error_rate_over_the_window_ejects_once_enough_requests_came() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=100, min_requests=10, error_rate=0.5, window=10)
    for _ in range(4):  # 8 requests, half failed: too few to judge
        succeed(d)
        fail(d)
    assert health(d).state is State.CLOSED
    succeed(d)
    fail(d)  # 10 requests, 5 failed
    assert health(d).state is State.EJECTED


def test_failures_slide_out_of_the_window() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=100, min_requests=10, error_rate=0.5)
    fail(d, 4)
    clock.advance(11)  # those four are older than the window now
    succeed(d, 5)
    fail(d, 4)  # 4 of 9, then 5 of 10 would eject had the old ones still counted
    succeed(d)
    fail(d)  # 5 of 11
    assert health(d).state is State.CLOSED
    fail(d)  # 6 of 12
    assert health(d).state is State.EJECTED


def test_slow_calls_eject_by_their_rate() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, min_requests=10, slow_call_seconds=2, slow_rate=0.8)
    succeed(d, 2)
    succeed(d, 7, first_byte=3.0)
    assert health(d).state is State.CLOSED  # 9 requests: too few
    succeed(d, first_byte=3.0)  # 8 slow of 10
    assert health(d).state is State.EJECTED


def test_a_half_open_deployment_lets_through_only_its_probes() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=1, half_open_probes=2, ejection_base=5)
    fail(d)
    clock.advance(5)
    h = health(d)
    assert h.available(clock.now)
    d.begin()
    assert h.available(clock.now)
    d.begin()
    assert not h.available(clock.now)  # both probes under way
    d.end(Outcome.OK, 0.1)
    assert h.state is State.CLOSED  # one success closes it
    assert h.available(clock.now)
    d.end(Outcome.OK, 0.1)
    assert h.state is State.CLOSED
    assert d.outstanding == 0


def test_a_failed_probe_ejects_again_for_twice_as_long_up_to_the_cap() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=1, ejection_base=5, ejection_max=30)
    h = health(d)
    fail(d)
    lengths = []
    for _ in range(5):
        lengths.append(h.ejected_until - clock.now)
        sit_out(clock, d)
        fail(d)  # the probe fails
    assert lengths == [5, 10, 20, 30, 30]
    assert h.ejections == 6


def test_ejections_shorten_again_after_a_healthy_stretch() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=1, ejection_base=5, ejection_max=300)
    h = health(d)
    fail(d)
    sit_out(clock, d)
    fail(d)  # second ejection: 10 s
    sit_out(clock, d)
    succeed(d)  # closed again
    assert h.state is State.CLOSED
    clock.advance(10)  # as long as the last ejection: one step back
    fail(d)
    assert h.ejected_until - clock.now == 10
    sit_out(clock, d)
    succeed(d)
    clock.advance(10 + 5)  # two stretches: back to the start
    fail(d)
    assert h.ejected_until - clock.now == 5


def test_at_most_the_configured_share_of_a_model_is_ejected() -> None:
    clock = FakeClock()
    four = deployments(clock, count=4, consecutive_failures=1, max_ejected_percent=50)
    for d in four:
        fail(d)
    assert [health(d).state for d in four].count(State.EJECTED) == 2
    assert [health(d).available(clock.now) for d in four] == [False, False, True, True]


def test_never_every_deployment_even_at_100_percent() -> None:
    clock = FakeClock()
    two = deployments(clock, count=2, consecutive_failures=1, max_ejected_percent=100)
    fail(two[0])
    fail(two[1])
    assert health(two[0]).state is State.EJECTED
    assert health(two[1]).state is State.CLOSED
    # While the first is half-open it still counts as out.
    clock.now = health(two[0]).ejected_until
    assert health(two[0]).available(clock.now)
    fail(two[1])
    assert health(two[1]).state is State.CLOSED
    succeed(two[0])
    fail(two[1])
    assert health(two[1]).state is State.EJECTED


def test_a_small_share_still_allows_one_ejection() -> None:
    clock = FakeClock()
    three = deployments(clock, count=3, consecutive_failures=1, max_ejected_percent=10)
    for d in three:
        fail(d)
    assert [health(d).state for d in three].count(State.EJECTED) == 1
    none = deployments(clock, count=3, consecutive_failures=1, max_ejected_percent=0)
    fail(none[0])
    assert health(none[0]).state is State.CLOSED


def test_a_429_cools_for_its_retry_after_and_is_no_failure() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=2, min_requests=1)
    h = health(d)
    for _ in range(50):
        attempt(d, Outcome.THROTTLED, retry_after=3)
    assert h.state is State.CLOSED
    assert not h.available(clock.now)
    assert h.back_at(clock.now) == pytest.approx(clock.now + 3)
    clock.advance(3)
    assert h.available(clock.now)
    fail(d)
    attempt(d, Outcome.THROTTLED)  # between two failures: they are still in a row
    fail(d)
    assert h.state is State.EJECTED


@pytest.mark.parametrize(
    ("retry_after", "cooling"),
    [(None, 1.0), (0.0, 1.0), (-5.0, 1.0), (float("nan"), 1.0), (1e9, MAX_COOLING), (0.25, 0.25)],
)
def test_cooling_without_a_usable_retry_after_is_short_and_capped(
    retry_after: float | None, cooling: float
) -> None:
    clock = FakeClock()
    d, _ = deployments(clock)
    d.begin()
    d.end(Outcome.THROTTLED, None, retry_after)
    assert health(d).cooled_until == pytest.approx(clock.now + cooling)


def test_recovery_closes_and_forgets_the_old_failures() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=3, min_requests=4, error_rate=0.5)
    fail(d, 3)
    clock.now = health(d).ejected_until
    succeed(d)
    assert health(d).state is State.CLOSED
    fail(d, 2)  # would eject at once if the window still held the three before
    assert health(d).state is State.CLOSED


def test_outcomes_while_ejected_do_not_change_the_ejection() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=1, ejection_base=5)
    h = health(d)
    fail(d)
    until = h.ejected_until
    succeed(d)  # the least bad of a model all out was used anyway
    fail(d)
    assert h.state is State.EJECTED
    assert h.ejected_until == until


def test_active_probes_feed_health_without_latency() -> None:
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=2)
    h = health(d)
    h.probed(False)
    h.probed(False)
    assert h.state is State.EJECTED
    clock.now = h.ejected_until
    h.probed(True)
    assert h.state is State.CLOSED
    assert h.ttfb_ewma is None


def test_time_to_first_byte_is_smoothed_and_forgotten_when_old() -> None:
    clock = FakeClock()
    d, _ = deployments(clock)
    h = health(d)
    assert h.latency(clock.now) is None
    succeed(d, first_byte=1.0)
    assert h.latency(clock.now) == 1.0
    succeed(d, first_byte=2.0)
    assert h.latency(clock.now) == pytest.approx(1.1)
    fail(d)  # failures say nothing about speed
    assert h.latency(clock.now) == pytest.approx(1.1)
    clock.advance(61)
    assert h.latency(clock.now) is None
    succeed(d, first_byte=0.5)
    assert h.latency(clock.now) == 0.5  # a fresh start, not a blend with the stale value


def test_an_attempt_without_a_verdict_frees_its_probe_and_judges_nothing() -> None:
    # A busy refusal or a client that left says nothing of the deployment: a half-open one
    # stays half-open (not closed as by a success), its probe place free for the next.
    clock = FakeClock()
    d, _ = deployments(clock, consecutive_failures=1, half_open_probes=1, ejection_base=5)
    fail(d)
    sit_out(clock, d)
    h = health(d)
    d.begin()
    assert not h.available(clock.now)
    d.end(Outcome.NO_VERDICT, None)
    assert h.state is State.HALF_OPEN
    assert h.available(clock.now)
    assert d.outstanding == 0
