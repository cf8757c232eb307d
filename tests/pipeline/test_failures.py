"""What a failed attempt means, and an upstream's Retry-After read safely."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sluice.errors import (
    MAX_RETRY_AFTER,
    DeploymentBusyError,
    ServiceUnavailableError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamStatusError,
    retry_after_seconds,
)
from sluice.pipeline.failures import Next, judge
from sluice.routing.deployment import Outcome

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        (b"0.25", 0.25),
        (" 7 ", 7.0),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),  # in the past: now
        ("99999999999", MAX_RETRY_AFTER),
        ("-3", None),
        ("nan", None),
        ("1e999", None),
        ("soon", None),
        ("", None),
        ("9" * 100, None),
        (None, None),
    ],
)
def test_retry_after_is_read_safely(value: str | bytes | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, NOW) == seconds


def test_retry_after_in_milliseconds() -> None:
    assert retry_after_seconds("1500", millis=True) == 1.5
    assert retry_after_seconds("Sat, 01 Mar 2025 12:00:30 GMT", NOW, millis=True) is None


def test_an_upstream_429_tells_the_client_when_to_come_back() -> None:
    assert UpstreamStatusError(429, b"", retry_after=1.2).headers == {"Retry-After": "2"}
    assert UpstreamStatusError(500, b"", retry_after=1.2).headers == {}


@pytest.mark.parametrize(
    ("error", "outcome", "step"),
    [
        (DeploymentBusyError("full"), Outcome.NO_VERDICT, Next.BUSY),
        (UpstreamAuthError("refused"), Outcome.FAILED, Next.ELSEWHERE),
        (
            UpstreamError("too large", code="upstream_response_too_large"),
            Outcome.FAILED,
            Next.ELSEWHERE,
        ),
        (ServiceUnavailableError("engine stopped"), Outcome.FAILED, Next.RETRY),
        (UpstreamStatusError(504, b""), Outcome.FAILED, Next.RETRY),
        (UpstreamStatusError(429, b""), Outcome.THROTTLED, Next.RETRY),
        (UpstreamStatusError(401, b""), Outcome.OK, Next.ANSWER),
        (UpstreamStatusError(400, b"not json"), Outcome.OK, Next.ANSWER),
        (
            UpstreamStatusError(
                400, b'{"error":{"code":["x"],"type":{},"innererror":{"code":[]}}}'
            ),
            Outcome.OK,
            Next.ANSWER,
        ),
        (UpstreamStatusError(400, b"[1, 2]"), Outcome.OK, Next.ANSWER),
    ],
)
def test_judgements(error: UpstreamError, outcome: Outcome, step: Next) -> None:
    failure = judge(error)
    assert (failure.outcome, failure.next) == (outcome, step)


def test_a_throttled_failure_carries_its_wait() -> None:
    assert judge(UpstreamStatusError(429, b"", retry_after=3)).retry_after == 3


@pytest.mark.parametrize("status", [429, 500, 503, 408])
def test_an_upstream_that_says_not_to_retry_is_not_called_again(status: int) -> None:
    # OpenAI's x-should-retry: false (an exhausted quota's 429, say): never this deployment
    # again; another deployment or a fallback may still serve.
    refused = judge(UpstreamStatusError(status, b"{}", should_retry=False))
    assert refused.next is Next.ELSEWHERE
    assert refused.outcome is judge(UpstreamStatusError(status, b"{}")).outcome
    assert judge(UpstreamStatusError(status, b"{}", should_retry=True)).next is Next.RETRY


def test_x_should_retry_is_read_from_the_upstreams_headers() -> None:
    from sluice.backends.openai_http import should_retry

    assert should_retry({b"x-should-retry": b"false"}) is False
    assert should_retry({b"x-should-retry": b"True"}) is True
    assert should_retry({b"x-should-retry": b"maybe"}) is None
    assert should_retry({}) is None
