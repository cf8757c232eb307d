"""Load shedding through the real gateway: a deployment's concurrency cap and queue in front
of a slow upstream; what is beyond them is refused at once with Retry-After."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette

from sluice.routing.capacity import Capacity
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway, serving

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "mock-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


class HeldUpstream:
    """An OpenAI-compatible upstream (ASGI) that holds every answer while `hold` is on, so
    the requests it serves stay in flight for as long as the test needs."""

    def __init__(self) -> None:
        self.arrived = 0
        self._arrivals = threading.Condition()
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self.arrived = 0
        self._open.clear()

    def wait_for_arrivals(self, count: int) -> bool:
        with self._arrivals:
            return self._arrivals.wait_for(lambda: self.arrived >= count, timeout=5)

    def let_go(self) -> None:
        self._open.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        with self._arrivals:
            self.arrived += 1
            self._arrivals.notify_all()
        await asyncio.to_thread(self._open.wait, 10)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})


async def test_beyond_the_cap_and_the_queue_requests_are_refused_at_once() -> None:
    upstream = HeldUpstream()
    with serving(upstream, lifespan="off") as port:
        config = config_for(f"http://127.0.0.1:{port}/v1", max_concurrency=2)
        config["resilience"] = {"queue": {"deployment_max_waiting": 2}}
        with running_gateway(config) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.post("/chat/completions", json=CHAT)).status_code == 200
                upstream.hold()
                try:
                    await _eight_at_once(url, upstream)
                finally:
                    upstream.let_go()
                metrics = (await client.get(url.removesuffix("/v1") + "/metrics")).text
    shed = (
        'sluice_shed_requests_total{deployment="gpt-4o-mini/0",model="gpt-4o-mini",'
        'reason="queue_full"} 4.0'
    )
    assert shed in metrics


async def _eight_at_once(url: str, upstream: HeldUpstream) -> None:
    # Raw connections, opened beforehand: what is timed is the gateway, not a client library.
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(8)]
    body = orjson.dumps(CHAT)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Answer:
        started = time.perf_counter()
        writer.write(request)
        answer = await _read_answer(reader)
        answer.took = time.perf_counter() - started
        writer.close()
        return answer

    pending = {asyncio.create_task(send(*connection)) for connection in connections}
    first: list[asyncio.Task[_Answer]] = []
    while len(first) < 4:
        done, pending = await asyncio.wait(pending, timeout=5, return_when="FIRST_COMPLETED")
        assert done, "fewer than four answers while the upstream holds the rest"
        first += done
    # Two requests hold the deployment's slots and two wait in its queue: the upstream
    # holds its answers, so the four that came back are the four refused.
    assert len(first) == 4
    assert len(pending) == 4
    for task in first:
        answer = task.result()
        assert answer.status == 503
        assert answer.headers["retry-after"] == "1"
        assert orjson.loads(answer.body)["error"]["code"] == "deployment_busy"
        assert answer.took < 0.05, f"a refusal took {answer.took * 1000:.1f} ms"
    # The second request to get a slot may still be on its way to the upstream.
    assert await asyncio.to_thread(upstream.wait_for_arrivals, 2)
    assert upstream.arrived == 2
    upstream.let_go()
    served = await asyncio.gather(*pending)
    assert [answer.status for answer in served] == [200] * 4
    assert upstream.arrived == 4


class _Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.took = 0.0


async def _read_answer(reader: asyncio.StreamReader) -> _Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        if line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return _Answer(status, headers, body)


def test_a_stream_holds_its_slot_until_it_closes(upstream: MockUpstream) -> None:
    apps: list[Starlette] = []
    config = config_for(upstream.url, max_concurrency=1)
    config["resilience"] = {"queue": {"deployment_max_waiting": 0}}
    with running_gateway(config, prepare=apps.append) as url:
        capacity = apps[0].state.router.deployments("gpt-4o-mini")[0].capacity
        assert isinstance(capacity, Capacity)
        with httpx.Client(base_url=url, timeout=10) as client:
            stalled = {**CHAT, "stream": True, "mock": {"stall_after_chunks": 1}}
            with client.stream("POST", "/chat/completions", json=stalled) as response:
                assert response.status_code == 200
                texts = response.iter_text()  # kept: a dropped iterator closes the stream
                received = ""
                while "tok0" not in received:
                    received += next(texts)
                assert capacity.active == 1
                busy = client.post("/chat/completions", json=CHAT)
                assert busy.status_code == 503
                assert busy.headers["retry-after"] == "1"
            # The client left mid-stream: the slot comes back when the gateway notices.
            _wait_for(lambda: capacity.active == 0)
            assert client.post("/chat/completions", json=CHAT).status_code == 200
            streamed = client.post("/chat/completions", json={**CHAT, "stream": True})
            assert streamed.text.endswith("data: [DONE]\n\n")
            _wait_for(lambda: capacity.active == 0)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the slot was not given back"
        time.sleep(0.01)
