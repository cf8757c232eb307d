"""Nobody goes unbilled: server-made request ids, budgets reserved at admission.

Each test ran against the code before the fix and failed there: one X-Request-ID reused
by a client erased all but one usage record and defeated max_parallel; a budget was
checked only against the stored spend, so everything that arrived before the first
usage batch was written got through.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from sluice.http_protocol import ConnectionLimits, protocol_factory
from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import CHAT, MASTER, Gateway, auth_config
from tests.gateway import running_gateway


async def _burst(
    url: str, key: str, count: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Counter[int]:
    """``count`` chat requests sent at once; their statuses."""
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as client:

        async def one() -> None:
            response = await client.post(
                f"{url}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}", **(headers or {})},
            )
            statuses[response.status_code] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def _usage_total(gw: Gateway, key_id: str, requests: int) -> dict[str, Any]:
    """The key's usage once ``requests`` records have been written (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        rows = gw.usage(key_id=key_id, group_by=["key"])
        if (rows and rows[0]["requests"] >= requests) or time.monotonic() > deadline:
            return rows[0] if rows else {"requests": 0, "cost_usd": 0.0}
        time.sleep(0.05)


def test_a_reused_client_request_id_is_still_one_record_per_request(gw: Gateway) -> None:
    created = gw.new_key()
    statuses = asyncio.run(
        _burst(gw.url, created["key"], 30, CHAT, headers={"X-Request-ID": "same-id"})
    )
    assert statuses == {200: 30}
    assert _usage_total(gw, created["id"], 30)["requests"] == 30


def test_a_reused_client_request_id_does_not_defeat_max_parallel(gw: Gateway) -> None:
    created = gw.new_key(max_parallel=2)
    slow = {**CHAT, "mock": {"latency_ms": 400}}
    statuses = asyncio.run(
        _burst(gw.url, created["key"], 10, slow, headers={"X-Request-ID": "same-id"})
    )
    assert statuses[200] <= 2, statuses
    assert statuses[429] >= 8, statuses


def test_concurrent_requests_cannot_spend_past_the_budget(gw: Gateway) -> None:
    # auth_config's pricing: $2000 per million completion tokens; the mock answers
    # max_tokens completion tokens. Make one request cost $5.55 against a $1 budget.
    gw_price_per_token = 2000 / 1_000_000
    max_tokens = 2775  # 2775 * $0.002 = $5.55 (the mock's default is 8: ask for more)
    body = {
        **CHAT,
        "max_tokens": max_tokens,
        "mock": {"latency_ms": 300, "completion_tokens": max_tokens},
    }
    cost = max_tokens * gw_price_per_token
    created = gw.new_key(budget_usd=1.0)
    statuses = asyncio.run(_burst(gw.url, created["key"], 30, body))
    assert set(statuses) <= {200, 429}, statuses
    served = statuses[200]
    usage = _usage_total(gw, created["id"], served)
    assert usage["requests"] == served
    # Within the budget plus one request's cost: here, the one request the key's last
    # cent lets through (the prompt adds a little on top of the completion).
    assert served == 1, statuses
    assert usage["cost_usd"] <= 1.0 + cost * 1.01


def _cost_of(completion_tokens: int) -> float:
    return completion_tokens * 2000 / 1_000_000  # auth_config's completion price


def test_legacy_completions_cannot_dodge_the_ceiling_with_max_completion_tokens(
    gw: Gateway,
) -> None:
    # /v1/completions knows only max_tokens: a max_completion_tokens of 1 beside it must
    # not shrink the hold (it once let 20 requests of $5.55 through a $1 budget).
    body = {
        "model": "gpt-4o-mini",
        "prompt": "hi",
        "max_completion_tokens": 1,
        "max_tokens": 2775,
        "mock": {"latency_ms": 300, "completion_tokens": 2775},
    }
    created = gw.new_key(budget_usd=1.0)
    statuses = asyncio.run(_burst_route(gw.url, "completions", created["key"], 20, body))
    assert statuses[200] == 1, statuses
    assert _usage_total(gw, created["id"], 1)["cost_usd"] <= 1.0 + _cost_of(2775) * 1.01


def test_a_request_without_max_tokens_is_held_to_the_ceiling_its_hold_assumed(
    gw: Gateway, upstream: MockUpstream
) -> None:
    # The mock would write 2,775 tokens; the gateway assumed limits.default_max_tokens
    # (1,024) for the hold, so it sends that ceiling: spend stays within budget + one.
    body = {**CHAT, "mock": {"latency_ms": 300, "completion_tokens": 2775}}
    del body["max_tokens"]
    created = gw.new_key(budget_usd=10.0)
    statuses = asyncio.run(_burst(gw.url, created["key"], 20, body))
    assert upstream.stats.last_body["max_tokens"] == 1024
    served = statuses[200]
    usage = _usage_total(gw, created["id"], served)
    assert usage["requests"] == served
    assert usage["cost_usd"] <= 10.0 + _cost_of(1024) * 1.01, (statuses, usage)


def test_the_prompt_is_held_at_one_token_per_byte(gw: Gateway) -> None:
    # 2,000 token ids in ~4 kB: bytes / 4 would hold ~$1 of prompt for ~$2 of cost.
    body = {
        "model": "gpt-4o-mini",
        "prompt": [1] * 2000,
        "max_tokens": 1,
        "mock": {"latency_ms": 300},
    }
    created = gw.new_key(budget_usd=10.0)
    statuses = asyncio.run(_burst_route(gw.url, "completions", created["key"], 20, body))
    served = statuses[200]
    usage = _usage_total(gw, created["id"], served)
    one = 2000 * 1000 / 1_000_000 + _cost_of(1)
    assert usage["cost_usd"] <= 10.0 + one * 1.01, (statuses, usage)


async def _burst_route(
    url: str, route: str, key: str, count: int, body: dict[str, Any]
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count)) as client:

        async def one() -> None:
            response = await client.post(
                f"{url}/{route}", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            statuses[response.status_code] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def test_a_client_that_stops_reading_a_stream_is_cut_and_billed(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a write deadline the gateway waited for such a client for ever: its stream
    # held its upstream call and its budget hold, and its usage went unrecorded until the
    # client chose to leave.
    monkeypatch.setenv("SLUICE_TEST_MASTER_KEY", MASTER)
    http = protocol_factory(ConnectionLimits(write_timeout=0.5))
    with running_gateway(auth_config(upstream.url, tmp_path), http=http) as url:
        base = url.removesuffix("/v1")
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {MASTER}"})
        created = admin.post("/admin/keys", json={"budget_usd": 1000.0}).json()
        body = orjson.dumps(
            {**CHAT, "stream": True, "max_tokens": 10**6, "mock": {"completion_tokens": 10**6}}
        )
        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (created["key"].encode(), len(body), body)
        )
        try:  # never read: the gateway must cut it and write its usage record (once the
            # kernel's buffers, a few MB on loopback, are full: seconds on a busy machine)
            deadline = time.monotonic() + 40
            while True:
                rows = admin.get("/admin/usage", params={"key_id": created["id"]}).json()["data"]
                if rows:
                    break
                assert time.monotonic() < deadline, "the stalled stream was never cut"
                time.sleep(0.1)
        finally:
            sock.close()
            admin.close()
    assert rows[0]["requests"] == 1
    assert rows[0]["completion_tokens"] > 0


def test_a_stream_left_early_is_billed_its_prompt_at_the_bound(gw: Gateway) -> None:
    # Without the upstream's usage the prompt was counted at bytes / 4: 2,000 token ids
    # in ~6 kB came to ~1,500 tokens, less than the upstream was paid for.
    created = gw.new_key(budget_usd=1000.0)
    body = {
        "model": "gpt-4o-mini",
        "prompt": [1] * 2000,
        "stream": True,
        "max_tokens": 50,
        "mock": {"completion_tokens": 50, "tokens_per_second": 20},
    }
    headers = {"Authorization": f"Bearer {created['key']}"}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{gw.url}/completions", json=body, headers=headers) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # the client leaves after the first event
    usage = _usage_total(gw, created["id"], 1)
    assert usage["prompt_tokens"] >= 2000


async def test_a_request_is_charged_to_the_budget_period_it_was_made_in() -> None:
    # The auth cache's key record may still carry yesterday's period and spend; the hold
    # and the usage record both belong to the period of the moment of admission.
    from datetime import UTC, datetime, timedelta

    from sluice.keys.store import KeyRecord
    from sluice.pipeline.admit import Admit
    from sluice.pipeline.auth import Principal
    from sluice.pipeline.budgets import MemoryBudgets
    from sluice.pipeline.context import RequestContext
    from sluice.pipeline.limits import MemoryLimiter
    from sluice.store.periods import current_period_start
    from sluice.store.usage import from_micros

    now = datetime.now(UTC)
    yesterday = current_period_start("daily", now - timedelta(days=1))
    key = KeyRecord(
        id="key_roll", key_hash="h", display="sk-…", budget_usd=1.0, budget_period="daily",
        spend_usd=0.95, period_started_at=yesterday,
    )  # fmt: skip
    admit = Admit(
        MemoryLimiter(),
        default_max_tokens=10,
        lease_seconds=60,
        budgets=MemoryBudgets(),
        prices={"m": (0.0, 40_000.0)},  # 10 completion tokens: $0.40
    )
    for n in range(2):  # $0.80 of today's $1: both fit; yesterday's $0.95 would refuse one
        ctx = RequestContext(request_id=f"r{n}", started=0.0, route="chat/completions")
        ctx.principal = Principal(key)
        reserving = admit.reserve_budget(ctx, "m", {"max_tokens": 10}, 0)
        assert reserving is not None
        await reserving
        assert ctx.budget_hold is not None
        assert ctx.budget_hold.account.endswith(current_period_start("daily", now).isoformat())
        assert from_micros(ctx.created_us) >= now
