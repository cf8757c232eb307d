"""Two mock upstreams as the deployments of one model, behind a real gateway, and what the
resilience tests read back: statuses, the x-sluice-* headers, upstream calls, metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from sluice.testing import MockUpstream

MODEL = "chat"
MESSAGES = [{"role": "user", "content": "hi"}]
FIRST_BYTE_TIMEOUT = 0.3
"""Seconds: the deployments' first-byte timeout, so that a stall costs little test time."""


def deployment(upstream: MockUpstream | str, name: str) -> dict[str, Any]:
    """A deployment on a mock upstream, or on a bare URL (an address nothing listens on)."""
    url = upstream if isinstance(upstream, str) else upstream.url
    return {
        "provider": "openai",
        "id": name,
        "api_base": url,
        "model": "mock-chat",
        "timeout": {"connect": 1, "first_byte": FIRST_BYTE_TIMEOUT, "total": 10},
    }


def config(
    *deployments: dict[str, Any],
    extra_models: list[dict[str, Any]] | None = None,
    model: dict[str, Any] | None = None,
    **resilience: Any,
) -> dict[str, Any]:
    """One model, ``MODEL``, on ``deployments``; ``resilience`` (retries, health, queue)
    merged over settings that keep tests short: quick backoffs, long ejections unless a
    test shortens them (so a test sees one ejection, not a series)."""
    settings: dict[str, dict[str, Any]] = {
        "retries": {"backoff_initial": 0.005, "backoff_max": 0.05},
        "health": {"consecutive_failures": 3, "ejection_base": 60},
    }
    for section, values in resilience.items():
        settings[section] = {**settings.get(section, {}), **values}
    return {
        "logging": {"level": "warning", "access_log": False},
        "usage": {"enabled": False},
        "models": [
            {"name": MODEL, "deployments": list(deployments), **(model or {})},
            *(extra_models or []),
        ],
        "resilience": settings,
    }


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    seconds: float
    events: list[Any] | None = None
    """A stream's data events (JSON objects, "[DONE]" as the string)."""

    @property
    def deployment(self) -> str | None:
        return self.headers.get("x-sluice-deployment")

    @property
    def attempts(self) -> int | None:
        value = self.headers.get("x-sluice-attempts")
        return int(value) if value is not None else None


def chat(client: httpx.Client, base: str, model: str = MODEL, stream: bool = False) -> Answer:
    """One chat request through the gateway; a stream is read to its end."""
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    start = time.monotonic()
    if not stream:
        reply = client.post(f"{base}/chat/completions", json=body)
        return Answer(reply.status_code, reply.headers, time.monotonic() - start)
    with client.stream("POST", f"{base}/chat/completions", json=body) as reply:
        events = [
            line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")
        ]
    parsed = [e if e == "[DONE]" else orjson.loads(e) for e in events]
    return Answer(reply.status_code, reply.headers, time.monotonic() - start, parsed)


def calls(*upstreams: MockUpstream) -> int:
    """Chat completion calls the upstreams received (refused ones included)."""
    return sum(u.stats.by_route.get("chat/completions", 0) for u in upstreams)


def metric(base: str, name: str, **labels: str) -> float | None:
    """A sample of the gateway's /metrics with exactly these labels (None when absent)."""
    text = httpx.get(base.removesuffix("/v1") + "/metrics").text
    wanted = sorted(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and sorted(match.group(1).split(",")) == wanted:
            return float(match.group(2))
    return None


def until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> float:
    """Poll ``check`` until it holds; the seconds it took (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(every)
    return time.monotonic() - start
