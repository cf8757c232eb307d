"""Keys, limits, budgets and usage over HTTP: on SQLite + memory and on PostgreSQL + Redis."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway
from tests.services import fresh_postgres_database, require_redis

MASTER = "sk-master-for-tests-0123456789"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Gateway:
    url: str  # …/v1
    admin: httpx.Client

    def new_key(self, **spec: Any) -> dict[str, Any]:
        response = self.admin.post("/admin/keys", json=spec)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def chat(self, key: str | None, **extra: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}/chat/completions", json={**CHAT, **extra}, headers=headers)

    def usage(self, **params: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            rows = self.admin.get("/admin/usage", params=params).json()["data"]
            if rows or time.monotonic() > deadline:
                return rows  # type: ignore[no-any-return]
            time.sleep(0.05)


def auth_config(upstream_url: str, data_dir: Path, **extra: Any) -> dict[str, Any]:
    config = config_for(upstream_url)
    config["models"][0]["pricing"] = {"prompt_per_million": 1000, "completion_per_million": 2000}
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_MASTER_KEY", "key_cache_ttl": 0},
        usage={"enabled": True, "flush_interval": 0.05},
        data_dir=str(data_dir),
        **extra,
    )
    return config


@pytest.fixture(
    params=[
        "sqlite+memory",
        pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def gw(request: pytest.FixtureRequest, upstream: MockUpstream, tmp_path: Path) -> Iterator[Gateway]:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    if request.param == "sqlite+memory":
        config = auth_config(upstream.url, tmp_path)
        with running_gateway(config) as url, _admin(url) as admin:
            yield Gateway(url, admin)
        return
    redis_url = require_redis()
    with fresh_postgres_database() as database_url:
        config = auth_config(upstream.url, tmp_path, database_url=database_url, redis_url=redis_url)
        with running_gateway(config) as url, _admin(url) as admin:
            yield Gateway(url, admin)


def _admin(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url.removesuffix("/v1"), headers={"Authorization": f"Bearer {MASTER}"}, timeout=10
    )


def test_key_lifecycle_through_the_sdk(gw: Gateway) -> None:
    created = gw.new_key(models=["gpt-4o-mini"], metadata={"user": "alice"})
    secret = created["key"]
    assert secret.startswith("sk-sluice-")
    assert created["display"] == f"sk-sluice-…{secret[-4:]}"
    listed = gw.admin.get("/admin/keys").json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert secret not in gw.admin.get("/admin/keys").text

    with openai.OpenAI(base_url=gw.url, api_key=secret, max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        assert [m.id for m in sdk.models.list()] == ["gpt-4o-mini"]  # only what it may use
        with pytest.raises(openai.PermissionDeniedError):
            sdk.embeddings.create(model="text-embedding-3-small", input="x")

    assert gw.admin.delete(f"/admin/keys/{created['id']}").json() == {
        "id": created["id"],
        "revoked": True,
    }
    with (
        openai.OpenAI(base_url=gw.url, api_key=secret, max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert caught.value.code == "key_revoked"


@pytest.mark.parametrize(
    ("headers", "url_suffix", "code"),
    [
        ({}, "", "missing_api_key"),
        ({"Authorization": "Bearer sk-sluice-nonsense"}, "", "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "", "missing_api_key"),
        ({}, f"?api_key={MASTER}", "key_in_query_string"),
    ],
)
def test_authentication_failures_are_401(
    gw: Gateway, headers: dict[str, str], url_suffix: str, code: str
) -> None:
    response = httpx.post(f"{gw.url}/chat/completions{url_suffix}", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_well_formed_key_and_api_key_header(gw: Gateway) -> None:
    real = gw.new_key()["key"]
    forged = real[:-10] + ("A" if real[-10] != "A" else "B") + real[-9:]
    assert gw.chat(forged).status_code == 401
    response = httpx.post(f"{gw.url}/chat/completions", json=CHAT, headers={"api-key": real})
    assert response.status_code == 200


def test_expired_key_is_401(gw: Gateway) -> None:
    key = gw.new_key(expires_at="2020-01-01T00:00:00Z")["key"]
    response = gw.chat(key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "key_expired"


def test_master_key_serves_and_admin_needs_it(gw: Gateway) -> None:
    assert gw.chat(MASTER).status_code == 200
    key = gw.new_key()["key"]
    base = gw.url.removesuffix("/v1")
    assert httpx.get(f"{base}/admin/keys").status_code == 401
    assert (
        httpx.get(f"{base}/admin/keys", headers={"Authorization": f"Bearer {key}"}).status_code
        == 403
    )
    admin = {"Authorization": f"Bearer {MASTER}"}  # the docs are behind the master key
    assert "/admin/keys" in httpx.get(f"{base}/openapi.json", headers=admin).json()["paths"]


def test_rpm_limit_and_ratelimit_headers(gw: Gateway) -> None:
    key = gw.new_key(rpm=3)["key"]
    first = gw.chat(key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert [gw.chat(key).status_code for _ in range(3)] == [200, 200, 429]
    refused = gw.chat(key)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 61  # 61 one-second buckets
    assert 0 < int(refused.headers["retry-after-ms"]) <= 61_000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_tpm_reservation_is_reconciled_with_real_usage(gw: Gateway) -> None:
    # The estimate is body/4 + max_tokens; real usage is a few tokens, refunded afterwards.
    key = gw.new_key(tpm=2000)["key"]
    first = gw.chat(key, max_tokens=1500)
    assert first.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 500  # the reservation
    second = gw.chat(key, max_tokens=1500)
    assert second.status_code == 200, "the first reservation was not refunded"
    too_big = gw.chat(key, max_tokens=5000)
    assert too_big.status_code == 429
    assert too_big.json()["error"]["code"] == "rate_limit_tpm"


def test_max_parallel(gw: Gateway) -> None:
    key = gw.new_key(max_parallel=1)["key"]
    slow: list[int] = []
    thread = threading.Thread(
        target=lambda: slow.append(gw.chat(key, mock={"latency_ms": 600}).status_code)
    )
    thread.start()
    time.sleep(0.2)
    response = gw.chat(key)
    thread.join()
    assert slow == [200]
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_parallel"
    assert gw.chat(key).status_code == 200  # the slot came back


def test_per_model_limits_within_a_key(gw: Gateway) -> None:
    key = gw.new_key(model_limits={"gpt-4o-mini": {"rpm": 1}})["key"]
    assert gw.chat(key).status_code == 200
    assert gw.chat(key).status_code == 429
    embed = httpx.post(
        f"{gw.url}/embeddings",
        json={"model": "text-embedding-3-small", "input": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert embed.status_code == 200


def test_budget_is_enforced_with_a_clear_message(gw: Gateway) -> None:
    # Pricing: $1000/M prompt + $2000/M completion; one call costs about $0.01.
    created = gw.new_key(budget_usd=0.005, budget_period="daily")
    assert gw.chat(created["key"]).status_code == 200
    deadline = time.monotonic() + 5
    while gw.admin.get(f"/admin/keys/{created['id']}").json()["spend_usd"] == 0:
        assert time.monotonic() < deadline, "spend never reached the key"
        time.sleep(0.05)
    refused = gw.chat(created["key"])
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    assert "Budget exceeded" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "budget_exceeded"


def test_usage_records_every_request_with_cost(gw: Gateway) -> None:
    created = gw.new_key()
    key = created["key"]
    assert gw.chat(key).status_code == 200
    stream = httpx.post(
        f"{gw.url}/chat/completions",
        json={**CHAT, "stream": True, "max_tokens": 3},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert "data: [DONE]" in stream.text
    assert gw.chat(key, mock={"status": 500}).status_code == 500
    deadline = time.monotonic() + 5
    while True:
        rows = gw.usage(key_id=created["id"], group_by=["key", "model"])
        if rows and rows[0]["requests"] == 3:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    row = rows[0]
    assert row["model"] == "gpt-4o-mini"
    assert row["completion_tokens"] == 4 + 3  # the stream was counted from its usage chunk
    expected = (row["prompt_tokens"] * 1000 + row["completion_tokens"] * 2000) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)


@pytest.mark.redis
def test_revocation_reaches_every_replica_through_redis(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    """Two replicas with a long key cache: a revoke on one is honoured by the other at once."""
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    config = auth_config(upstream.url, tmp_path, redis_url=require_redis())
    config["auth"]["key_cache_ttl"] = 300
    with running_gateway(config) as url_a, running_gateway(config) as url_b, _admin(url_a) as admin:
        a, b = Gateway(url_a, admin), Gateway(url_b, admin)
        created = a.new_key()
        assert b.chat(created["key"]).status_code == 200  # now cached on b for 300 s
        assert admin.delete(f"/admin/keys/{created['id']}").status_code == 200
        deadline = time.monotonic() + 2
        while b.chat(created["key"]).status_code == 200:
            assert time.monotonic() < deadline, "replica b still accepts a revoked key"
            time.sleep(0.02)
        assert b.chat(created["key"]).json()["error"]["code"] == "key_revoked"


def test_limits_beyond_32_bits_are_refused_with_400(gw: Gateway) -> None:
    response = gw.admin.post("/admin/keys", json={"tpm": 100_000_000_000})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tpm"
