"""`sluice batches list|show|cancel` on the database a gateway wrote."""

from __future__ import annotations

import io
import os
from pathlib import Path

import openai
import orjson
import yaml
from click.testing import CliRunner

from sluice.cli import main
from sluice.testing.mock_upstream import MockUpstream
from tests.batches.test_batches_sdk import MASTER, batch_config, chat_line, jsonl
from tests.gateway import running_gateway


def test_list_show_and_cancel(tmp_path: Path) -> None:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with MockUpstream() as upstream:
        upstream.behaviour.latency_ms = 300
        config = batch_config(upstream, tmp_path, concurrency=1)
        path = tmp_path / "sluice.yaml"
        path.write_text(yaml.safe_dump(config))
        with (
            running_gateway(config) as url,
            openai.OpenAI(base_url=url, api_key=MASTER, max_retries=0) as client,
        ):
            lines = [chat_line(f"r{i}") for i in range(20)]
            uploaded = client.files.create(
                file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
            )
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            runner = CliRunner()
            listed = runner.invoke(main, ["batches", "list", "--config", str(path)])
            assert listed.exit_code == 0, listed.output
            rows = [orjson.loads(line) for line in listed.output.splitlines()]
            assert [(r["id"], r["status"], r["key_id"]) for r in rows] == [
                (batch.id, "in_progress", None)
            ]
            shown = runner.invoke(main, ["batches", "show", batch.id, "--config", str(path)])
            assert orjson.loads(shown.output)["request_counts"]["total"] == 20
            cancelled = runner.invoke(main, ["batches", "cancel", batch.id, "--config", str(path)])
            assert cancelled.exit_code == 0, cancelled.output
            assert client.batches.retrieve(batch.id).status in ("cancelling", "cancelled")
            again = runner.invoke(main, ["batches", "cancel", batch.id, "--config", str(path)])
            assert again.exit_code == 1
            missing = runner.invoke(main, ["batches", "show", "batch_nope", "--config", str(path)])
            assert missing.exit_code == 1
