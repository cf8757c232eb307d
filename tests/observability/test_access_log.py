"""The access log: one JSON line per request, written once per event-loop turn."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from sluice.observability.logging import ACCESS_LOGGER, AccessLog


@pytest.fixture(autouse=True)
def _access_logger_at_info() -> Iterator[None]:
    """The access log writes only when its logger is enabled for info."""
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_lines_of_one_turn_go_out_together_at_its_end() -> None:
    stream = io.StringIO()
    log = AccessLog(True, stream)
    log.write({"request_id": "a", "status": 200})
    log.write({"request_id": "b", "status": 404})
    assert stream.getvalue() == ""  # nothing yet: the turn is not over
    await asyncio.sleep(0)  # the turn ends, the scheduled flush runs
    entries = _lines(stream)
    assert [e["request_id"] for e in entries] == ["a", "b"]
    assert all(e["logger"] == "sluice.access" and e["msg"] == "request" for e in entries)
    assert stream.getvalue().endswith("}\n")

    log.write({"request_id": "c", "status": 200})  # a later turn schedules its own flush
    await asyncio.sleep(0)
    assert [e["request_id"] for e in _lines(stream)] == ["a", "b", "c"]


async def test_flush_writes_what_is_pending_at_once() -> None:
    stream = io.StringIO()
    log = AccessLog(True, stream)
    log.write({"request_id": "a"})
    log.flush()
    assert [e["request_id"] for e in _lines(stream)] == ["a"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(_lines(stream)) == 1


def test_outside_an_event_loop_each_line_is_written_at_once() -> None:
    stream = io.StringIO()
    log = AccessLog(True, stream)
    log.write({"request_id": "a"})
    assert [e["request_id"] for e in _lines(stream)] == ["a"]


def test_disabled_log_writes_nothing() -> None:
    stream = io.StringIO()
    log = AccessLog(False, stream)
    log.write({"request_id": "a"})
    log.flush()
    assert stream.getvalue() == ""
