"""The Batch API driven by the official openai SDK: upload, create, poll, download, cancel."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

MASTER = "sk-master-for-batch-tests-0123456789"


def batch_config(upstream: MockUpstream, data_dir: Path, **batches: Any) -> dict[str, Any]:
    config = config_for(upstream.url)
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_MASTER_KEY", "key_cache_ttl": 0},
        usage={"enabled": True, "flush_interval": 0.05},
        data_dir=str(data_dir),
        # No pace: these tests want their lines run at once.
        batches={
            "poll_interval": 0.05,
            "housekeeping": 0.1,
            "max_lines_per_second": None,
            **batches,
        },
    )
    return config


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(custom_id: str, content: str = "hi", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 16,
            **body,
        },
    }


@pytest.fixture
def sdk(tmp_path: Path) -> Iterator[tuple[openai.OpenAI, MockUpstream, str]]:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with MockUpstream() as upstream, running_gateway(batch_config(upstream, tmp_path)) as url:
        admin = openai.OpenAI(base_url=url, api_key=MASTER, max_retries=0)
        import httpx

        created = httpx.post(
            url.removesuffix("/v1") + "/admin/keys",
            json={},
            headers={"Authorization": f"Bearer {MASTER}"},
        ).json()
        client = openai.OpenAI(base_url=url, api_key=created["key"], max_retries=0)
        admin.close()
        yield client, upstream, url
        client.close()


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def test_the_whole_flow_through_the_sdk(sdk: tuple[openai.OpenAI, MockUpstream, str]) -> None:
    client, upstream, _ = sdk
    lines = [chat_line(f"req-{i}", f"question {i}") for i in range(20)]
    lines.append(chat_line("bad-upstream", mock={"status": 400}))
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress"
    assert batch.metadata == {"job": "nightly"}
    done = wait_for(client, batch.id, {"completed"})
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (21, 20)
    assert done.request_counts.failed == 1
    assert done.completed_at is not None
    assert done.output_file_id is not None
    assert done.error_file_id is not None
    output = [
        orjson.loads(x) for x in client.files.content(done.output_file_id).read().splitlines()
    ]
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(20)]
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert output[0]["response"]["body"]["object"] == "chat.completion"
    errors = [orjson.loads(x) for x in client.files.content(done.error_file_id).read().splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [
        ("bad-upstream", 400)
    ]
    listed = client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    assert upstream.stats.requests == 21


def test_a_bad_file_fails_at_once_naming_its_lines(
    sdk: tuple[openai.OpenAI, MockUpstream, str],
) -> None:
    client, upstream, _ = sdk
    lines = [
        chat_line("a"),
        chat_line("a"),  # duplicate
        {**chat_line("b"), "url": "/v1/embeddings"},
        chat_line("c", model="no-such-model"),
    ]
    data = jsonl(lines) + b"{not json\n"
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None
    found = [(e.line, e.code) for e in batch.errors.data or []]
    assert found == [
        (2, "duplicate_custom_id"),
        (3, "mismatched_url"),
        (4, "model_not_found"),
        (5, "invalid_json_line"),
    ]
    assert upstream.stats.requests == 0


def test_cancel_stops_new_lines_and_keeps_what_was_done(
    sdk: tuple[openai.OpenAI, MockUpstream, str],
) -> None:
    client, upstream, _ = sdk
    upstream.behaviour.latency_ms = 200
    lines = [chat_line(f"r{i}") for i in range(40)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    time.sleep(0.5)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = wait_for(client, batch.id, {"cancelled"})
    counts = done.request_counts
    assert counts is not None
    assert 0 < counts.completed < 40
    assert counts.completed + counts.failed == 40
    assert done.error_file_id is not None
    errors = client.files.content(done.error_file_id).read().splitlines()
    assert all(orjson.loads(e)["error"]["code"] == "batch_cancelled" for e in errors)
    assert upstream.stats.requests == counts.completed


def test_another_key_sees_nothing(sdk: tuple[openai.OpenAI, MockUpstream, str]) -> None:
    client, _, url = sdk
    uploaded = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("x")]))), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    import httpx

    other = httpx.post(
        url.removesuffix("/v1") + "/admin/keys",
        json={},
        headers={"Authorization": f"Bearer {MASTER}"},
    ).json()["key"]
    with openai.OpenAI(base_url=url, api_key=other, max_retries=0) as stranger:
        with pytest.raises(openai.NotFoundError):
            stranger.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            stranger.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            stranger.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert stranger.batches.list().data == []


def test_creation_is_bounded(sdk: tuple[openai.OpenAI, MockUpstream, str]) -> None:
    import httpx

    client, _, url = sdk
    key = {"Authorization": f"Bearer {client.api_key}"}
    too_big = {"input_file_id": "file-x", "metadata": {"pad": "x" * 70_000}}
    refused = httpx.post(f"{url}/batches", json=too_big, headers=key)
    assert refused.status_code == 413
    assert "larger than the limit of 65536 bytes" in refused.json()["error"]["message"]
    uploaded = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("x", mock={"latency_ms": 2000})]))),
        purpose="batch",
    )
    for _ in range(10):  # batches.max_open_per_key
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.RateLimitError) as caught:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert caught.value.code == "too_many_open_batches"
