"""The cache with virtual keys: namespaces, controls per key, limits and usage records."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import MASTER, Gateway, _admin, auth_config
from tests.gateway import GatewayProcess, running_gateway
from tests.services import fresh_postgres_database, require_redis


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as upstream:
        yield upstream


PINNED: dict[str, Any] = {"temperature": 0, "max_tokens": 16}  # deterministic, not cut short


def cached(upstream: MockUpstream, tmp_path: Path, **cache: Any) -> dict[str, Any]:
    config = auth_config(upstream.url, tmp_path)
    config["cache"] = {"enabled": True, **cache}
    return config


@pytest.fixture
def gw(mock: MockUpstream, tmp_path: Path) -> Iterator[Gateway]:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with running_gateway(cached(mock, tmp_path)) as url, _admin(url) as admin:
        yield Gateway(url, admin)


def result(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return reply.headers["x-sluice-cache"]


def test_one_key_never_reads_another_keys_answers(gw: Gateway, mock: MockUpstream) -> None:
    alice, bob = gw.new_key()["key"], gw.new_key()["key"]
    assert [result(gw.chat(alice, **PINNED)) for _ in range(2)] == ["miss", "hit"]
    assert result(gw.chat(bob, **PINNED)) == "miss"
    assert gw.chat(None, **PINNED).status_code == 401  # authenticated first
    assert [result(gw.chat(MASTER, **PINNED)) for _ in range(2)] == ["miss", "hit"]
    assert mock.stats.requests == 3


def test_a_team_shares_its_answers_and_only_its_own(mock: MockUpstream, tmp_path: Path) -> None:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with (
        running_gateway(cached(mock, tmp_path, namespace="team")) as url,
        _admin(url) as admin,
    ):
        gw = Gateway(url, admin)
        red_1, red_2 = (gw.new_key(team="red")["key"] for _ in range(2))
        blue, loner = gw.new_key(team="blue")["key"], gw.new_key()["key"]
        assert result(gw.chat(red_1, **PINNED)) == "miss"
        assert result(gw.chat(red_2, **PINNED)) == "hit"
        assert result(gw.chat(blue, **PINNED)) == "miss"
        assert result(gw.chat(loner, **PINNED)) == "miss"  # no team: its own namespace
        assert mock.stats.requests == 3


def test_a_key_may_be_denied_the_controls(gw: Gateway, mock: MockUpstream) -> None:
    obedient = gw.new_key(cache_controls=False)["key"]
    first = gw.chat(obedient, **PINNED, cache={"no-store": True})
    assert result(first) == "miss"
    assert "cache" not in mock.stats.last_body  # the field never goes upstream
    forced = gw.chat(obedient, **PINNED, cache={"no-cache": True})
    assert result(forced) == "hit"  # its no-store was ignored, and so is its no-cache
    assert result(gw.chat(obedient, temperature=0.9, cache={"max-age": 60})) == "bypass"


def test_hits_count_toward_rpm_but_cost_nothing(gw: Gateway) -> None:
    created = gw.new_key(rpm=3, tpm=5000)
    key = created["key"]
    first = gw.chat(key, **PINNED)
    hit = gw.chat(key, **PINNED)
    assert (result(first), result(hit)) == ("miss", "hit")
    again = gw.chat(key, **PINNED)
    assert result(again) == "hit"
    # A hit uses no upstream tokens: the first hit's reservation was given back whole.
    tokens_left = "x-ratelimit-remaining-tokens"
    assert again.headers[tokens_left] == hit.headers[tokens_left]
    assert gw.chat(key, **PINNED).status_code == 429  # rpm 3: hits are requests too
    deadline = time.monotonic() + 5
    while True:
        rows = gw.usage(key_id=created["id"], group_by=["key"])
        if rows and rows[0]["requests"] == 3:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    row = rows[0]
    assert row["cache_hits"] == 2
    one_call = (row["prompt_tokens"] / 3 * 1000 + row["completion_tokens"] / 3 * 2000) / 1e6
    assert row["cost_usd"] == pytest.approx(one_call)  # only the miss is priced


def test_admin_flush_by_namespace_and_model(gw: Gateway, mock: MockUpstream) -> None:
    alice, bob = gw.new_key(), gw.new_key()
    for key in (alice, bob):
        gw.chat(key["key"], **PINNED)
    described = gw.admin.get("/admin/cache").json()
    assert described["memory_entries"] == 2
    assert described["models"][0]["model"] == "gpt-4o-mini"
    flushed = gw.admin.post("/admin/cache/flush", json={"namespace": f"key:{alice['id']}"})
    assert flushed.json() == {"flushed": 1, "everywhere": False}
    assert result(gw.chat(alice["key"], **PINNED)) == "miss"
    assert result(gw.chat(bob["key"], **PINNED)) == "hit"
    assert gw.admin.post("/admin/cache/flush", json={"model": "gpt-4o-mini"}).json()["flushed"] == 2
    assert result(gw.chat(bob["key"], **PINNED)) == "miss"
    refused = httpx.post(f"{gw.url.removesuffix('/v1')}/admin/cache/flush", json={})
    assert refused.status_code == 401


@pytest.mark.redis
@pytest.mark.postgres
def test_the_redis_tier_is_shared_by_two_processes(mock: MockUpstream, tmp_path: Path) -> None:
    """Two gateway processes on one Redis and one database: an answer stored by one is
    served by the other, and a flush on one reaches both."""
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    redis_url = require_redis()
    with fresh_postgres_database() as database_url:
        config = cached(mock, tmp_path, redis=True)
        config.update(redis_url=redis_url, database_url=database_url)
        processes = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            env = {"SLUICE_TEST_MASTER_KEY": MASTER}
            processes.append(GatewayProcess(config, tmp_path / name, env=env))
        try:
            first, second = (process.start() for process in processes)
            with _admin(first.url + "/v1") as admin_a, _admin(second.url + "/v1") as admin_b:
                admin_a.post("/admin/cache/flush", json={})  # Redis outlives tests
                a, b = Gateway(first.url + "/v1", admin_a), Gateway(second.url + "/v1", admin_b)
                key = a.new_key()["key"]
                body = {**PINNED, "messages": [{"role": "user", "content": "shared?"}]}
                assert result(a.chat(key, **body)) == "miss"
                assert result(b.chat(key, **body)) == "hit"
                assert result(a.chat(key, **body)) == "hit"
                assert mock.stats.requests == 1
                assert admin_b.post("/admin/cache/flush", json={}).json()["everywhere"] is True
                time.sleep(0.2)  # the flush reaches the other process's memory tier
                assert result(a.chat(key, **body)) == "miss"
        finally:
            for process in processes:
                process.stop()
