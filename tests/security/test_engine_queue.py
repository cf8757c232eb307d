"""The embedded engine under hostile requests, on the real packaged SmolLM2 (one slot).

A request cannot expand into more sequences than allowed, cannot reorder the shared queue
with a ``priority`` of its own, and a large prompt is tokenized off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from sluice.backends.base import Route, UpstreamCall
from sluice.engine.types import GenerationRequest
from sluice.errors import InvalidRequestError, ServiceUnavailableError
from tests.extras import needs_local

if TYPE_CHECKING:
    from sluice.backends.local import LocalBackend

pytestmark = [
    needs_local,
    pytest.mark.asyncio(loop_scope="module"),
]

LONG = [{"role": "user", "content": "Write a very long essay about the history of Rome."}]


def make_backend() -> LocalBackend:
    from sluice.backends.local import LocalBackend
    from sluice.engine.config import EngineConfig

    config = EngineConfig(n_ctx=1024, threads=1, parallel=1, max_queue=8)
    return LocalBackend("local-security", config)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LocalBackend]:
    b = make_backend()
    await b.start()
    yield b
    await b.close()


def call(route: Route, key_priority: int = 0, **body: Any) -> UpstreamCall:
    """A call as the API makes it: ``key_priority`` is the caller's key's, ``body`` the
    client's own JSON (which may carry a ``priority`` of its own)."""
    body.setdefault("model", "smollm2")
    stream = bool(body.get("stream"))
    return UpstreamCall(route, body, None, "req", stream, priority=key_priority)


async def until(check: Callable[[], bool], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if check():
            return
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_prompts_times_n_is_refused_before_tokenizing_or_queueing(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = backend.engine.tokenize

    def counting(text: str, **kwargs: Any) -> list[int]:
        nonlocal calls
        calls += 1
        return real(text, **kwargs)

    monkeypatch.setattr(backend.engine, "tokenize", counting)
    with pytest.raises(InvalidRequestError) as info:
        await backend.send(call("completions", prompt=["x"] * 2000, n=128, max_tokens=1))
    assert info.value.param == "n"
    assert calls == 0
    assert backend.engine.stats().waiting == 0


async def test_a_body_priority_does_not_jump_a_higher_keys_request(
    backend: LocalBackend,
) -> None:
    engine = backend.engine
    prompt = engine.tokenize_chat(LONG)
    blocker = engine.generate(GenerationRequest(prompt, max_tokens=500, temperature=0.0))
    await blocker.__anext__()  # the only slot is busy: everything below waits
    order: list[str] = []

    async def send(name: str, key_priority: int, **body: Any) -> None:
        await backend.send(
            call("chat/completions", key_priority, messages=LONG, max_tokens=1, **body)
        )
        order.append(name)

    # First in line, claiming the top priority in its body, from a key of priority 0.
    claimer = asyncio.create_task(send("body-100", 0, priority=100))
    await until(lambda: engine.stats().waiting == 1)
    keyed = asyncio.create_task(send("key-5", 5))
    await until(lambda: engine.stats().waiting == 2)
    await blocker.aclose()
    await asyncio.gather(claimer, keyed)
    assert order == ["key-5", "body-100"]


class Ticker:
    """Measures the longest stall of the event loop while it runs."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


SLOW = 1.0  # seconds a stand-in tokenizer blocks whoever calls it


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
async def test_a_large_prompt_is_tokenized_off_the_event_loop(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, route: Route
) -> None:
    engine = backend.engine
    text = "The history of Rome. " * 100  # 2,100 characters
    # Tokenizing (a completion) or rendering the template (a chat) takes a second here,
    # in a sleep that releases the GIL as llama_tokenize does.
    if route == "completions":
        body: dict[str, Any] = {"prompt": text}
        real_tokenize = engine.tokenize

        def slow_tokenize(text: str, **kwargs: Any) -> list[int]:
            time.sleep(SLOW)
            return real_tokenize(text, **kwargs)

        monkeypatch.setattr(engine, "tokenize", slow_tokenize)
    else:
        body = {"messages": [{"role": "user", "content": text}]}
        real_render = engine.model.render_chat

        def slow_render(messages: Any) -> str:
            time.sleep(SLOW)
            return real_render(messages)

        monkeypatch.setattr(engine.model, "render_chat", slow_render)
    async with Ticker() as ticker:
        started = time.perf_counter()
        reply = await backend.send(call(route, max_tokens=1, **body))
        elapsed = time.perf_counter() - started
    assert reply.status == 200
    assert elapsed >= SLOW
    assert ticker.longest < SLOW / 2


async def test_a_short_prompt_is_tokenized_inline(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_offload(*args: Any) -> Any:
        raise AssertionError("offloaded")

    monkeypatch.setattr(backend.engine, "offload", no_offload)
    reply = await backend.send(call("chat/completions", messages=LONG, max_tokens=1))
    assert reply.status == 200


async def test_closing_waits_for_a_tokenization_in_flight() -> None:
    """The model is freed only after the tokenizer thread is done with its vocabulary."""
    b = make_backend()
    await b.start()
    real = b.engine.model.tokenize
    finished: list[float] = []

    def slow(text: str, **kwargs: Any) -> list[int]:
        time.sleep(0.5)
        tokens = real(text, **kwargs)  # would read freed memory if the model were gone
        finished.append(time.perf_counter())
        return tokens

    b.engine.tokenize = slow  # type: ignore[method-assign]
    request = asyncio.create_task(b.send(call("completions", prompt="x " * 600, max_tokens=1)))
    await asyncio.sleep(0.1)
    await b.close()
    closed = time.perf_counter()
    assert finished
    assert finished[0] <= closed
    with pytest.raises(ServiceUnavailableError):
        await request
