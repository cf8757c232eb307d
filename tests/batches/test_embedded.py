"""The Batch API on the embedded model: the default `sluice serve` runs batches too."""

from __future__ import annotations

import io
import time
from pathlib import Path

import openai
import orjson

from tests.batches.test_batches_sdk import jsonl
from tests.extras import needs_local
from tests.gateway import running_gateway

pytestmark = needs_local


def test_a_batch_runs_on_the_embedded_model(tmp_path: Path) -> None:
    config = {
        "data_dir": str(tmp_path),
        "usage": {"flush_interval": 0.05},
        "batches": {"poll_interval": 0.05, "housekeeping": 0.1, "max_lines_per_second": None},
        "models": [
            {
                "name": "smollm2",
                "deployments": [
                    {"provider": "local", "context_size": 512, "parallel": 2, "threads": 1}
                ],
            }
        ],
    }
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Say the number {i}."}],
                "max_tokens": 8,
                "temperature": 0,
            },
        }
        for i in range(3)
    ]
    too_long = {
        "custom_id": "too-long",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "word " * 2000}],  # past 512 tokens
            "max_tokens": 8,
        },
    }
    lines.append(too_long)
    with (
        running_gateway(config) as url,
        openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client,
    ):
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 120
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done.output_file_id is not None
        assert done.error_file_id is not None
        output = client.files.content(done.output_file_id).read().splitlines()
        answers = {orjson.loads(line)["custom_id"]: orjson.loads(line) for line in output}
        assert set(answers) == {"q0", "q1", "q2"}
        for answer in answers.values():
            body = answer["response"]["body"]
            assert body["model"] == "smollm2"
            assert body["usage"]["completion_tokens"] <= 8
            assert body["choices"][0]["message"]["content"]
        (error,) = client.files.content(done.error_file_id).read().splitlines()
        failed = orjson.loads(error)
        assert failed["custom_id"] == "too-long"
        assert failed["response"]["status_code"] == 400

        # And a cancel, while the engine works through a longer batch.
        many = [
            {**lines[0], "custom_id": f"m{i}", "body": {**lines[0]["body"], "max_tokens": 48}}
            for i in range(30)
        ]
        uploaded = client.files.create(file=("m.jsonl", io.BytesIO(jsonl(many))), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert client.batches.cancel(batch.id).status == "cancelling"
        while (cancelled := client.batches.retrieve(batch.id)).status != "cancelled":
            assert time.monotonic() < deadline + 60, cancelled
            time.sleep(0.2)
        counts = cancelled.request_counts
        assert counts is not None
        assert counts.completed < 30
        assert counts.completed + counts.failed == 30
