"""Over HTTP: a call's queue priority is its key's, never a ``priority`` in the body."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from sluice.backends.base import Backend, UpstreamCall, UpstreamReply
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

MASTER = "sk-master-for-engine-priority-0123456789"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Recording:
    """The real backend, noting the priority of every call it is given."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.priorities: list[int] = []

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        self.priorities.append(call.priority)
        return await self.inner.send(call)

    def stream(self, call: UpstreamCall) -> Any:
        self.priorities.append(call.priority)
        return self.inner.stream(call)


def gateway(config: dict[str, Any], recorded: list[Recording]) -> Any:
    def prepare(app: Starlette) -> None:
        deployment = app.state.router.deployments("gpt-4o-mini")[0]
        deployment.backend = Recording(deployment.backend)
        recorded.append(deployment.backend)

    return running_gateway(config, prepare=prepare)


def test_open_mode_is_priority_zero_whatever_the_body_says(upstream: MockUpstream) -> None:
    recording: list[Recording] = []
    with gateway(config_for(upstream.url), recording) as url:
        for body_priority in (100, -100, "high"):
            response = httpx.post(
                f"{url}/chat/completions", json={**CHAT, "priority": body_priority}
            )
            assert response.status_code == 200
            # Nor does the body's priority reach a remote upstream (vLLM schedules by it).
            assert "priority" not in upstream.stats.last_body
    assert recording[0].priorities == [0, 0, 0]


def test_the_key_sets_the_priority(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording: list[Recording] = []
    monkeypatch.setenv("SLUICE_TEST_ENGINE_MASTER_KEY", MASTER)
    config = config_for(upstream.url)
    config.update(
        auth={"master_key": "os.environ/SLUICE_TEST_ENGINE_MASTER_KEY", "key_cache_ttl": 0},
        data_dir=str(tmp_path),
    )
    with gateway(config, recording) as url:
        admin = {"Authorization": f"Bearer {MASTER}"}
        base = url.removesuffix("/v1")
        keys = {}
        for priority in (7, 0):
            created = httpx.post(f"{base}/admin/keys", json={"priority": priority}, headers=admin)
            assert created.status_code == 201, created.text
            keys[priority] = created.json()["key"]
        for key in (keys[7], keys[0], MASTER):
            response = httpx.post(
                f"{url}/chat/completions",
                json={**CHAT, "priority": 100},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 200
        stream = httpx.post(
            f"{url}/chat/completions",
            json={**CHAT, "stream": True, "priority": -5},
            headers={"Authorization": f"Bearer {keys[7]}"},
        )
        assert stream.status_code == 200
    # The master key has no key record: it is everyone's default, 0.
    assert recording[0].priorities == [7, 0, 0, 7]
