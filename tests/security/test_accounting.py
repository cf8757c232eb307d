"""Nobody goes unbilled: server-made request ids, budgets reserved at admission.

Each test ran against the code before the fix and failed there: one X-Request-ID reused
by a client erased all but one usage record and defeated max_parallel; a budget was
checked only against the stored spend, so everything that arrived before the first
usage batch was written got through.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from tests.api.test_keys_and_limits import CHAT, Gateway


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
