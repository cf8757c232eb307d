"""A local deployment's request defaults reach the real engine (packaged SmolLM2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import pytest_asyncio

from sluice.backends.base import UpstreamCall
from sluice.backends.local_params import RequestDefaults
from tests.extras import needs_local

if TYPE_CHECKING:
    from sluice.backends.local import LocalBackend

pytestmark = [
    needs_local,
    pytest.mark.asyncio(loop_scope="module"),
]

SYSTEM = "You are a helpful assistant."
USER = {"role": "user", "content": "What is the capital of France?"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LocalBackend]:
    from sluice.backends.local import LocalBackend
    from sluice.engine.config import EngineConfig

    defaults = RequestDefaults(temperature=0.0, max_tokens=3, system_prompt=SYSTEM)
    b = LocalBackend(
        "defaults-test", EngineConfig(n_ctx=512, threads=1, parallel=2), None, None, defaults
    )
    await b.start()
    yield b
    await b.close()


async def ask(backend: LocalBackend, **body: Any) -> dict[str, Any]:
    body = {"model": "smollm2", **body}
    reply = await backend.send(UpstreamCall("chat/completions", body, None, "req-1"))
    assert reply.status == 200
    data: dict[str, Any] = orjson.loads(reply.body)
    return data


async def test_bare_request_gets_the_system_prompt_and_max_tokens(backend: LocalBackend) -> None:
    bare = await ask(backend, messages=[USER])
    explicit = await ask(backend, messages=[{"role": "system", "content": SYSTEM}, USER])
    assert bare["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"]
    assert bare["choices"][0]["message"] == explicit["choices"][0]["message"]  # greedy
    assert bare["usage"]["completion_tokens"] <= 3


async def test_request_values_win(backend: LocalBackend) -> None:
    own = await ask(backend, messages=[{"role": "system", "content": "Hi."}, USER], max_tokens=1)
    bare = await ask(backend, messages=[USER], max_tokens=1)
    assert own["usage"]["prompt_tokens"] < bare["usage"]["prompt_tokens"]
    assert own["usage"]["completion_tokens"] == 1
