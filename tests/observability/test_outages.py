"""A failing dependency's log lines: the first at once, then at most one per interval, and
every failure counted in some line; over HTTP, a Redis outage logs a few lines, not one per
request, while the metric counts every failure."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import httpx
import pytest

from sluice.observability.outages import OutageLog
from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import CHAT, MASTER, auth_config
from tests.gateway import free_port, running_gateway

LOGGER = "tests.outages"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _counted(lines: list[str]) -> int:
    """Failures the lines account for (a line without a count stands for one)."""
    total = 0
    for line in lines:
        found = re.search(r": (\d+) failures in ", line)
        total += int(found.group(1)) if found else 1
    return total


def test_first_failure_is_logged_at_once_then_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outages = OutageLog(logging.getLogger(LOGGER), "redis down", interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, LOGGER):
        outages.failed(ConnectionError("refused 1"))
        assert _lines(caplog) == ["redis down: refused 1"]
        for i in range(2, 1001):  # a thousand failures within the interval: no new line
            clock.now += 0.001
            outages.failed(ConnectionError(f"refused {i}"))
        assert len(_lines(caplog)) == 1
        clock.now = 110.5  # the interval is over: the next failure writes the count
        outages.failed(ConnectionError("refused 1001"))
        lines = _lines(caplog)
        assert len(lines) == 2
        assert lines[1] == "redis down: 1000 failures in 10.5 s, the last: refused 1001"
        outages.flush()  # nothing pending: no line
        assert len(_lines(caplog)) == 2
    assert _counted(_lines(caplog)) == 1001


async def test_failures_after_the_last_line_are_written_when_the_interval_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outages = OutageLog(logging.getLogger(LOGGER), "redis down", interval=0.05)
    with caplog.at_level(logging.WARNING, LOGGER):
        for i in range(20):
            outages.failed(ConnectionError(f"refused {i}"))
        assert len(_lines(caplog)) == 1
        await asyncio.sleep(0.15)  # no further failure: the scheduled line reports them
        lines = _lines(caplog)
    assert len(lines) == 2
    assert lines[1].startswith("redis down: 19 failures in ")
    assert lines[1].endswith("the last: refused 19")
    assert _counted(lines) == 20


def test_flush_writes_what_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    """Services.close flushes: failures counted just before shutdown are not lost."""
    clock = Clock()
    outages = OutageLog(logging.getLogger(LOGGER), "redis down", interval=10, clock=clock)
    with caplog.at_level(logging.WARNING, LOGGER):
        outages.failed(ConnectionError("a"))
        outages.failed(ConnectionError("b"))  # no running loop: nothing scheduled
        outages.flush()
    assert _lines(caplog) == ["redis down: a", "redis down: b"]


def test_redis_outage_fails_open_with_a_few_log_lines(
    upstream: MockUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis unreachable, limits fail open: every request is served and counted in
    sluice_limiter_failures_total; the log gets one line, not one per request."""
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    closed = free_port()  # nothing listens there
    config = auth_config(upstream.url, tmp_path, redis_url=f"redis://127.0.0.1:{closed}/0")
    requests = 40
    with caplog.at_level(logging.WARNING, "sluice.services"), running_gateway(config) as url:
        admin = {"Authorization": f"Bearer {MASTER}"}
        base = url.removesuffix("/v1")
        created = httpx.post(f"{base}/admin/keys", json={"rpm": 1000}, headers=admin)
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        for _ in range(requests):
            response = httpx.post(
                f"{url}/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
            assert "x-ratelimit-limit-requests" not in response.headers  # not counted
        metrics = httpx.get(f"{base}/metrics").text
    failures = re.search(r"^sluice_limiter_failures_total (\S+)$", metrics, re.M)
    assert failures is not None
    assert float(failures.group(1)) == requests
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "sluice.services" and "rate limiter unavailable" in r.getMessage()
    ]
    # The first failure at once; the rest in at most one more line (the 10 s interval
    # outlasts the test; shutdown's flush writes the count).
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("rate limiter unavailable (admitting requests, fail open): ")
    assert _counted(lines) == requests
