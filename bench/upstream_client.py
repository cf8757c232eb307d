#!/usr/bin/env python3
"""CPU per request of the upstream client and the SSE relay alone (a development probe).

One process, one event loop: a raw asyncio server on 127.0.0.1 answers every POST with a
fixed 200 (Content-Length) on a kept-alive connection, and `HTTP1Pool.post` is called
REQUESTS times in a row; then `relay_events` frames a 40-event stream, one event per
chunk, STREAMS times. Prints CPU microseconds per request and per stream (process time:
client and server together, so differences are the client's).

A/B of two source trees: run it once per tree with PYTHONPATH pointing at its src/,
alternating, several rounds, and compare medians:

    for i in 1 2 3 4 5; do
      PYTHONPATH=/tmp/base/src python bench/upstream_client.py
      PYTHONPATH=src python bench/upstream_client.py
    done
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from sluice.backends.http1 import HTTP1Pool
from sluice.pipeline.context import RequestContext
from sluice.pipeline.sse import relay_events

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "2000"))
BODY = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":9}}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"token"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":40}}\n\n'


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]  # one request per packet


async def client() -> float:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HTTP1Pool(f"http://127.0.0.1:{port}/v1", 4, 2.0, 5.0)
    head = b"Content-Type: application/json\r\nAuthorization: Bearer sk-x\r\n"
    for _ in range(200):  # warm up
        await pool.post("/chat/completions", head, b"{}")
    started = time.process_time()
    for _ in range(REQUESTS):
        await pool.post("/chat/completions", head, b'{"model":"m"}')
    spent = time.process_time() - started
    await pool.close()
    server.close()
    return spent / REQUESTS * 1e6


async def _events() -> AsyncIterator[bytes]:
    for _ in range(40):
        yield EVENT
    yield USAGE
    yield b"data: [DONE]\n\n"


async def relay() -> float:
    started = time.process_time()
    for _ in range(STREAMS):
        ctx = RequestContext("rid", 0.0)
        async for _ in relay_events(_events(), ctx, strip_usage=True):
            pass
    return (time.process_time() - started) / STREAMS * 1e6


async def main() -> None:
    per_request = await client()
    per_stream = await relay()
    print(f"client {per_request:.1f} us/request   relay {per_stream:.1f} us/stream")


if __name__ == "__main__":
    asyncio.run(main())
