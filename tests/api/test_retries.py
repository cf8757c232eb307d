"""Retries and fallbacks through the real gateway, in front of an upstream of this test's
own that fails the first calls of a script (503, 429, a reset, a stall before the response
or before the first event), then answers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.gateway import free_port, running_gateway

COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "upstream",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "upstream",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}


class ScriptedUpstream:
    """An OpenAI-shaped upstream whose answers follow a script named in the body
    (``"script": "name"``): each call takes the script's next step, then "ok"."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[str]] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.models: dict[str, list[str]] = defaultdict(list)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, name: str, *steps: str) -> dict[str, str]:
        self.scripts[name] = list(steps)
        return {"script": name}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = body.get("script", "-")
        self.calls[name] += 1
        self.models[name].append(body["model"])
        steps = self.scripts.get(name) or []
        step = steps.pop(0) if steps else "ok"
        if step in ("503", "429"):
            headers = {"retry-after-ms": "20"} if step == "429" else None
            error = {"error": {"message": "busy", "type": "x", "param": None, "code": None}}
            return web.json_response(error, status=int(step), headers=headers)
        if step == "reset":
            transport = request.transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return web.Response()
        if step == "stall":
            await asyncio.sleep(3600)  # cancelled when the gateway gives up
        if not body.get("stream"):
            return web.json_response(COMPLETION)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if step == "stall-first-event":
            await asyncio.sleep(3600)
        await response.write(b"data: " + orjson.dumps(CHUNK) + b"\n\n")
        if step == "reset-after-first-event":
            request.transport.abort()  # type: ignore[union-attr]
            return response
        await response.write(b"data: " + orjson.dumps(CHUNK) + b"\n\ndata: [DONE]\n\n")
        return response

    def __enter__(self) -> ScriptedUpstream:
        threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True).start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def retrying(scripted: ScriptedUpstream) -> Iterator[str]:
    timeout = {"connect": 1, "first_byte": 0.5, "total": 10}
    live = {"provider": "openai", "api_base": scripted.url, "timeout": timeout}
    dead = {**live, "api_base": f"http://127.0.0.1:{free_port()}/v1"}
    config = {
        "logging": {"level": "warning", "access_log": False},
        "usage": {"enabled": False},
        "models": [
            {"name": "chat", "deployments": [{**live, "model": "chat-upstream"}]},
            {"name": "pair", "deployments": [{**dead, "id": "dead"}, {**live, "id": "live"}]},
            {"name": "primary", "deployments": [dead], "fallbacks": ["backup"]},
            {"name": "backup", "deployments": [{**live, "model": "backup-upstream"}]},
        ],
    }
    with running_gateway(config) as url:
        yield url


def chat(gateway: str, model: str = "chat", **body: Any) -> httpx.Response:
    messages = [{"role": "user", "content": "hi"}]
    payload = {"model": model, "messages": messages, **body}
    return httpx.post(f"{gateway}/chat/completions", json=payload, timeout=10)


@pytest.mark.parametrize(
    ("steps", "attempts"),
    [(("503", "503"), 3), (("reset",), 2), (("stall",), 2), (("429",), 2)],
    ids=["503-twice", "reset", "stall-before-the-response", "429"],
)
def test_failures_before_the_first_byte_are_hidden(
    retrying: str, scripted: ScriptedUpstream, steps: tuple[str, ...], attempts: int
) -> None:
    name = "-".join(steps)
    response = chat(retrying, **scripted.script(name, *steps))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hi"
    assert response.headers["x-sluice-attempts"] == str(attempts)
    assert response.headers["x-sluice-deployment"] == "chat/0"
    assert response.headers["x-sluice-model"] == "chat"
    assert scripted.calls[name] == attempts


def stream(gateway: str, script: dict[str, str]) -> tuple[httpx.Headers, list[str]]:
    """A streamed chat request: the response's headers and its data lines."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{gateway}/chat/completions", json={**body, **script}, timeout=10
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    return response.headers, events


def test_a_stream_stalled_before_its_first_event_is_retried(
    retrying: str, scripted: ScriptedUpstream
) -> None:
    headers, events = stream(retrying, scripted.script("stream-stall", "stall-first-event"))
    assert headers["x-sluice-attempts"] == "2"
    assert events[-1] == "data: [DONE]"
    assert sum('"content":"hi"' in event for event in events) == 2
    assert scripted.calls["stream-stall"] == 2


def test_a_stream_is_not_retried_once_it_has_begun(
    retrying: str, scripted: ScriptedUpstream
) -> None:
    headers, events = stream(retrying, scripted.script("stream-broken", "reset-after-first-event"))
    assert headers["x-sluice-attempts"] == "1"
    assert '"content":"hi"' in events[0]
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == "upstream_reset"
    assert scripted.calls["stream-broken"] == 1


def test_an_unreachable_deployment_is_passed_over(retrying: str) -> None:
    for _ in range(4):
        response = chat(retrying, "pair")
        assert response.status_code == 200
        assert response.headers["x-sluice-deployment"] == "live"


def test_a_fallback_model_serves_when_the_model_cannot(
    retrying: str, scripted: ScriptedUpstream
) -> None:
    response = chat(retrying, "primary", **scripted.script("fallback"))
    assert response.status_code == 200
    assert response.headers["x-sluice-model"] == "backup"
    assert response.headers["x-sluice-attempts"] == "2"
    assert scripted.models["fallback"] == ["backup-upstream"]


def test_the_sdk_does_not_retry_what_the_gateway_retried(
    retrying: str, scripted: ScriptedUpstream
) -> None:
    # The SDK's default is two retries of its own: nine upstream calls without the header.
    sdk = openai.OpenAI(base_url=retrying, api_key="sk-client")
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            extra_body=scripted.script("down", *["503"] * 10),
        )
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.headers["x-sluice-attempts"] == "3"
    assert scripted.calls["down"] == 3
