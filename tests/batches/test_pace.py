"""batches.max_lines_per_second: a process starts batch lines no faster than its pace."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, cast

import openai

from sluice.batches.runner import BatchRunner
from sluice.batches.settings import BatchSettings
from sluice.testing.mock_upstream import MockUpstream
from tests.batches.test_batches_sdk import MASTER, batch_config, chat_line, jsonl, wait_for
from tests.gateway import running_gateway


def runner(**settings: Any) -> BatchRunner:
    nothing = cast(Any, None)
    return BatchRunner(
        BatchSettings(**settings),
        nothing,
        nothing,
        nothing,
        nothing,
        nothing,
        None,
        None,
        nothing,
        authenticated=False,
    )


def test_without_a_pace_every_free_place_is_taken() -> None:
    worker = runner(concurrency=4, max_lines_per_second=None)
    assert worker._allowance(4, 100.0) == 4
    worker._paced(4, 100.0)
    assert worker._allowance(3, 100.0) == 3


def test_the_pace_spaces_lines_after_a_first_burst_of_concurrency() -> None:
    worker = runner(concurrency=4, max_lines_per_second=10)
    assert worker._allowance(4, 100.0) == 4  # idle for long: a burst, at most concurrency
    worker._paced(4, 100.0)
    assert worker._allowance(4, 100.0) == 0
    assert worker._allowance(4, 100.09) == 0
    assert worker._allowance(4, 100.11) == 1
    worker._paced(1, 100.11)
    assert worker._allowance(4, 100.15) == 0
    assert worker._allowance(4, 100.45) == 3  # behind: owed lines start together
    assert worker._allowance(2, 100.45) == 2  # but never more than the free places
    assert worker._allowance(0, 200.0) == 0


def test_a_paced_batch_takes_at_least_its_lines_over_the_rate(tmp_path: Path) -> None:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with MockUpstream() as upstream:
        config = batch_config(upstream, tmp_path, concurrency=4, max_lines_per_second=10)
        with (
            running_gateway(config) as url,
            openai.OpenAI(base_url=url, api_key=MASTER, max_retries=0) as client,
        ):
            lines = [chat_line(f"r{i}") for i in range(12)]
            uploaded = client.files.create(
                file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
            )
            started = time.monotonic()
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = wait_for(client, batch.id, {"completed"})
            # A burst of 4, then 8 more at 10 a second.
            assert time.monotonic() - started >= 0.75
            assert done.request_counts is not None
            assert done.request_counts.completed == 12
            assert upstream.stats.requests == 12
