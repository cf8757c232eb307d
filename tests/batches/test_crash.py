"""A batch on two replicas sharing PostgreSQL, one of them killed half-way (SIGKILL): the
batch completes, every custom_id appears exactly once in the output or error file, and
each line that reached the upstream is charged exactly once."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.batches.test_batches_sdk import MASTER, batch_config, chat_line, jsonl
from tests.gateway import GatewayProcess
from tests.services import fresh_postgres_database

LINES = 2000

pytestmark = pytest.mark.postgres


def test_a_replica_killed_half_way_loses_nothing_and_charges_nothing_twice(
    tmp_path: Path,
) -> None:
    with fresh_postgres_database() as database_url, MockUpstream() as upstream:
        upstream.behaviour.latency_ms = 5
        config = batch_config(upstream, tmp_path / "data", lease_seconds=10, concurrency=8)
        config["database_url"] = database_url
        config["files"] = {"storage": "database"}  # the replicas share no disk
        config["models"][0]["pricing"] = {"prompt_per_million": 1, "completion_per_million": 1}
        replicas = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            env = {"SLUICE_TEST_MASTER_KEY": MASTER}
            replicas.append(GatewayProcess(config, tmp_path / name, env=env))
        try:
            first, second = (replica.start(timeout=30) for replica in replicas)
            admin = {"Authorization": f"Bearer {MASTER}"}
            key = httpx.post(f"{first.url}/admin/keys", json={}, headers=admin).json()
            with openai.OpenAI(base_url=first.url + "/v1", api_key=key["key"]) as client:
                lines = [chat_line(f"line-{i}", f"question {i}") for i in range(LINES)]
                uploaded = client.files.create(
                    file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
                )
                batch = client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
                while _progress(client, batch.id) < LINES // 2:
                    time.sleep(0.05)
                first.stop()  # SIGKILL, half-way
            with openai.OpenAI(base_url=second.url + "/v1", api_key=key["key"]) as client:
                deadline = time.monotonic() + 120
                while (done := client.batches.retrieve(batch.id)).status != "completed":
                    assert time.monotonic() < deadline, done
                    time.sleep(0.2)
                ids = _custom_ids(client, done.output_file_id) + _custom_ids(
                    client, done.error_file_id
                )
            assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))  # each once
            rows = asyncio.run(_usage(database_url, batch.id))
            assert len(rows) == LINES  # one usage record per line: none lost, none twice
            assert {r["request_id"] for r in rows} == {f"{batch.id}-{i + 1}" for i in range(LINES)}
            spend = httpx.get(f"{second.url}/admin/keys/{key['id']}", headers=admin).json()
            assert spend["spend_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
            assert upstream.stats.requests >= LINES  # some lines may have run twice upstream
        finally:
            for replica in replicas:
                replica.stop()


def _progress(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return counts.completed + counts.failed if counts is not None else 0


def _custom_ids(client: openai.OpenAI, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    content = client.files.content(file_id).read()
    return [orjson.loads(line)["custom_id"] for line in content.splitlines()]


async def _usage(database_url: str, batch_id: str) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, cost_usd FROM usage_records WHERE batch_id = $1", batch_id
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]
