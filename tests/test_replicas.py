"""Several Sluice processes: shared limits across replicas, and no usage lost on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluice.services import database_for
from sluice.settings import Settings
from sluice.store.database import Database
from sluice.store.usage import UsageStore
from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import MASTER, auth_config
from tests.gateway import GatewayProcess
from tests.services import fresh_postgres_database, require_redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ENV = {"SLUICE_TEST_MASTER_KEY": MASTER}


def create_key(base_url: str, **spec: Any) -> str:
    response = httpx.post(
        f"{base_url}/admin/keys", json=spec, headers={"Authorization": f"Bearer {MASTER}"}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_three_replicas_share_one_rpm_limit(upstream: MockUpstream, tmp_path: Path) -> None:
    with _replicas(upstream, tmp_path) as (replicas, _):
        key = create_key(replicas[0].url, rpm=600)
        statuses, retry_afters = asyncio.run(
            _spread([r.url for r in replicas], key, total=1200, concurrency=48)
        )
    assert set(statuses) <= {200, 429}, statuses
    assert 600 <= statuses[200] <= 606, statuses
    assert statuses[429] == 1200 - statuses[200]
    assert retry_afters
    assert all(1 <= value <= 61 for value in retry_afters), sorted(set(retry_afters))


@contextmanager
def _replicas(
    upstream: MockUpstream, tmp_path: Path, count: int = 3
) -> Iterator[tuple[list[GatewayProcess], Database]]:
    """``count`` replicas sharing Redis and a fresh PostgreSQL database (handed over
    unstarted; it is dropped when the block ends)."""
    redis_url = require_redis()
    with fresh_postgres_database() as database_url:
        config = auth_config(upstream.url, tmp_path, database_url=database_url, redis_url=redis_url)
        replicas: list[GatewayProcess] = []
        try:
            for index in range(count):
                folder = tmp_path / f"replica{index}"
                folder.mkdir()
                replicas.append(GatewayProcess(config, folder, env=ENV).start())
            yield replicas, Database(database_url)
        finally:
            for replica in replicas:
                replica.stop()


async def _stored_usage(database: Database) -> tuple[int, list[dict[str, Any]]]:
    """Usage rows stored, and their totals per key."""
    await database.start()
    try:
        usage = UsageStore(database)
        return await usage.count(), await usage.query(group_by=("key",))
    finally:
        await database.close()


async def _spread(
    urls: list[str], key: str, total: int, concurrency: int
) -> tuple[Counter[int], list[int]]:
    statuses: Counter[int] = Counter()
    retry_afters: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                url = f"{urls[i % len(urls)]}/v1/chat/completions"
                response = await client.post(url, json=CHAT, headers=headers)
                statuses[response.status_code] += 1
                if response.status_code == 429:
                    retry_afters.append(int(response.headers["retry-after"]))

        async with asyncio.timeout(55):  # the whole run stays inside one minute
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, retry_afters


def _durability_backends() -> list[Any]:
    return [
        "sqlite",
        pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend", _durability_backends())
def test_sigterm_with_200_streams_in_flight_loses_no_usage(
    upstream: MockUpstream, tmp_path: Path, backend: str
) -> None:
    if backend == "sqlite":
        _run_durability(upstream, tmp_path, auth_config(upstream.url, tmp_path))
        return
    redis_url = require_redis()
    with fresh_postgres_database() as database_url:
        config = auth_config(upstream.url, tmp_path, database_url=database_url, redis_url=redis_url)
        _run_durability(upstream, tmp_path, config)


def _run_durability(upstream: MockUpstream, tmp_path: Path, config: dict[str, Any]) -> None:
    config["server"] = {"drain_timeout": 30}
    config["usage"] = {"enabled": True, "flush_interval": 0.2, "batch_size": 64}
    gateway = GatewayProcess(config, tmp_path, env=ENV).start()
    assert gateway.process is not None
    try:
        key = create_key(gateway.url)
        accepted, completion_tokens = asyncio.run(_streams_then_sigterm(gateway, key, count=200))
        assert gateway.process.wait(40) == 0, gateway.log()[-3000:]
    finally:
        gateway.stop()
    assert accepted == 200

    rows, totals = asyncio.run(_stored_usage(database_for(Settings(**config))))
    assert rows == accepted
    assert totals[0]["requests"] == accepted
    assert totals[0]["completion_tokens"] == completion_tokens == 200 * 15


async def _streams_then_sigterm(gateway: GatewayProcess, key: str, count: int) -> tuple[int, int]:
    """Open ``count`` slow streams, SIGTERM the server once all are flowing, finish them."""
    started = asyncio.Event()
    flowing = 0
    accepted = 0
    tokens = 0
    body = {**CHAT, "stream": True, "max_tokens": 15}
    body["mock"] = {"tokens_per_second": 8, "completion_tokens": 15}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count + 10)

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def stream() -> None:
            nonlocal flowing, accepted, tokens
            url = f"{gateway.url}/v1/chat/completions"
            async with client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    return
                accepted += 1
                async for line in response.aiter_lines():
                    if '"content":"tok' in line:
                        tokens += 1
                        if tokens and flowing < count and line.count("tok0 "):
                            flowing += 1
                            if flowing == count:
                                started.set()

        tasks = [asyncio.create_task(stream()) for _ in range(count)]
        await asyncio.wait_for(started.wait(), 30)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    return accepted, tokens


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_three_replicas_spend_at_most_the_budget_plus_one_request(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    # auth_config's prices: $1000/M prompt, $2000/M completion tokens: 200 completion
    # tokens cost $0.40, plus a few prompt tokens. A $1 budget, 30 requests at a time.
    body = {**CHAT, "max_tokens": 200, "mock": {"completion_tokens": 200, "latency_ms": 150}}
    with _replicas(upstream, tmp_path) as (replicas, database):
        key = create_key(replicas[0].url, budget_usd=1.0)
        statuses: Counter[int] = Counter()
        for _ in range(3):  # three waves of 30
            statuses += asyncio.run(_wave([r.url for r in replicas], key, body, 30))
        for replica in replicas:
            assert replica.terminate() == 0  # drained: every usage record written
        rows, totals = asyncio.run(_stored_usage(database))  # before the database goes
    assert set(statuses) <= {200, 429}, statuses
    served = statuses[200]
    assert rows == served  # every served request has its row
    one_request = max(0.40, totals[0]["cost_usd"] / served)
    assert totals[0]["cost_usd"] <= 1.0 + one_request, (totals, statuses)
    assert served >= 2  # the budget was used, not refused outright


async def _wave(urls: list[str], key: str, body: dict[str, Any], count: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as client:

        async def one(i: int) -> None:
            url = f"{urls[i % len(urls)]}/v1/chat/completions"
            response = await client.post(url, json=body, headers=headers)
            statuses[response.status_code] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return statuses
