"""A mock OpenAI-compatible upstream, for tests, demos and benchmarks.

Routes (OpenAI's shapes, so the official SDK parses them)::

    POST /v1/chat/completions   stream and not; content is "tok0 tok1 ..."
    POST /v1/completions        the same, as text_completion
    POST /v1/embeddings         one deterministic unit vector per input (float or base64)
    GET  /v1/models             a single "mock-model"
    GET  /mock/stats            the `MockStats` counters as JSON
    POST /mock/reset            zero the counters
    GET  /mock/faults           the random faults in force (`sluice.testing.faults`)
    POST /mock/faults           change some of them (a JSON object of `MockFaults` fields)
    DELETE /mock/faults         turn every fault off

The ``/mock/faults`` changes answer loopback clients only.

Every request is shaped by a `MockBehaviour`. The app's defaults can be overridden per
request, so one mock serves many test cases at once. Precedence: body > headers > defaults.

* body: a top-level ``"mock": {"latency_ms": 50, "status": 500}`` (MockBehaviour's names);
* headers: ``x-mock-<field name with dashes>``, e.g. ``x-mock-latency-ms: 50``,
  ``x-mock-stall: 1``.

Controls, in the order they act:

``latency_ms``          sleep before anything is sent (errors and resets included).
``reset``               close the TCP connection with an RST, no response at all.
``stall``               never send a response (streams too) until the client leaves.
``status``              any value other than 200 answers with that status and an OpenAI error
                        envelope (code ``mock_error``); a 429 carries ``retry-after: 1``.
``completion_tokens``   tokens per completion; ``max_tokens`` (or ``max_completion_tokens``)
                        below it cuts the answer short with finish_reason "length".
``tokens_per_second``   pacing between streamed content chunks (0 = as fast as possible).
``fail_after_chunks``   streams: after N content chunks, reset the connection (no [DONE]).
``stall_after_chunks``  streams: after N content chunks, go silent until the client leaves.
``embedding_dim``       length of each embedding vector.

On top of them, random faults drawn per request from a seeded generator (errors, resets,
429s with Retry-After, stalls before and after the first byte, added latency, down): see
`sluice.testing.faults`. They apply to every API route and are counted in
``MockStats.faults``; a mock started without faults draws none.

The server notices a vanished client at once (handler cancellation is on, and waits also
poll the transport), and counts the stream in ``streams_cancelled``. `MockUpstream` runs
the app on a loopback port in a background thread; ``run_mock_upstream`` runs it in the
foreground for ``sluice mock-upstream``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import itertools
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from sluice.testing.faults import Draw, Fault, FaultInjector, MockFaults, retry_after_headers


@dataclass
class MockBehaviour:
    """Defaults for every request; each field can be overridden per request."""

    latency_ms: float = 0.0
    tokens_per_second: float = 0.0
    completion_tokens: int = 8
    status: int = 200
    fail_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    stall: bool = False
    reset: bool = False
    embedding_dim: int = 8


@dataclass
class MockStats:
    """Counters, mutated only on the server's event loop; read them from anywhere."""

    requests: int = 0
    by_route: dict[str, int] = field(default_factory=dict)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    """The client went away before the stream finished."""
    streams_failed: int = 0
    """Streams the mock broke on purpose (``fail_after_chunks``)."""
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: Any = None
    request_ids: list[str] = field(default_factory=list)
    embedding_calls: int = 0
    embedding_inputs: list[int] = field(default_factory=list)
    """Number of inputs in each embeddings call, in arrival order."""
    faults: dict[str, int] = field(default_factory=dict)
    """Random faults injected, by kind (`sluice.testing.faults.Fault` values)."""

    def reset(self) -> None:
        """Zero every counter in place, so references to this object stay valid."""
        for f in fields(self):
            setattr(self, f.name, getattr(MockStats(), f.name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STATS_KEY = web.AppKey("sluice_mock_stats", MockStats)
BEHAVIOUR_KEY = web.AppKey("sluice_mock_behaviour", MockBehaviour)
FAULTS_KEY = web.AppKey("sluice_mock_faults", FaultInjector)

_KINDS: dict[str, str] = {
    "latency_ms": "float",
    "tokens_per_second": "float",
    "completion_tokens": "int",
    "status": "int",
    "fail_after_chunks": "int?",
    "stall_after_chunks": "int?",
    "stall": "bool",
    "reset": "bool",
    "embedding_dim": "int",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ids = itertools.count(1)
_DONE = b"data: [DONE]\n\n"


class _BadRequest(Exception):
    """Answered with a 400 OpenAI envelope."""


def _coerce(name: str, value: Any) -> Any:
    kind = _KINDS[name]
    text = value.strip().lower() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool | int):
            return bool(value)
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    if kind == "int?" and (value is None or text in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value) if kind == "float" else int(value)


def _resolve(default: MockBehaviour, request: web.Request, body: Any) -> MockBehaviour:
    changes: dict[str, Any] = {}
    for name in _KINDS:
        header = request.headers.get("x-mock-" + name.replace("_", "-"))
        if header is not None:
            changes[name] = header
    mock = body.get("mock") if isinstance(body, dict) else None
    if mock is not None:
        if not isinstance(mock, dict) or not set(mock) <= set(_KINDS):
            raise _BadRequest(f"'mock' must be an object with keys among {sorted(_KINDS)}")
        changes.update(mock)
    try:
        return replace(default, **{k: _coerce(k, v) for k, v in changes.items()})
    except (TypeError, ValueError) as exc:
        raise _BadRequest(f"invalid mock override: {exc}") from None


def _error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    err_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    envelope = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(envelope), content_type="application/json", headers=headers
    )


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(route: str, body: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenisation: whitespace-split words, at least 1."""

    def count(item: Any) -> int:
        if isinstance(item, str):
            return _words(item)
        if isinstance(item, list):
            if item and all(isinstance(i, int) for i in item):
                return len(item)  # a pre-tokenised prompt
            return sum(count(i) for i in item)
        if isinstance(item, dict):  # a chat message or a content part
            return count(item.get("content")) + count(item.get("text"))
        return 0

    key = {"chat/completions": "messages", "completions": "prompt"}.get(route, "input")
    return max(1, count(body.get(key)))


def _is_closing(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _wait_for_disconnect(request: web.Request) -> None:
    """Sleep until the client leaves (handler cancellation usually cuts this short)."""
    # aiohttp exposes no disconnect event, so poll; cheap, and only while stalled.
    while not _is_closing(request):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _reset_connection(request: web.Request) -> None:
    """Abort the TCP connection with an RST, so the client sees a reset, not a clean close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _choice(chat: bool, stream: bool, text: str | None, finish: str | None) -> dict[str, Any]:
    """One choice; in a chat stream, text "" is the role chunk and None the finish chunk."""
    choice: dict[str, Any] = {"index": 0}
    if not chat:
        choice["text"] = text or ""
    elif not stream:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    elif text == "":
        choice["delta"] = {"role": "assistant", "content": ""}
    else:
        choice["delta"] = {} if text is None else {"content": text}
    choice.update(logprobs=None, finish_reason=finish)
    return choice


async def _completion(
    request: web.Request,
    route: str,
    body: dict[str, Any],
    b: MockBehaviour,
    stall_after_first: float = 0.0,
) -> web.StreamResponse:
    """A completion; a stream goes silent for ``stall_after_first`` seconds after its first
    event (a fault), then goes on."""
    chat = route == "chat/completions"
    limit = body.get(
        "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    )
    n_tokens = b.completion_tokens
    finish = "stop"
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < n_tokens:
        n_tokens, finish = max(0, limit), "length"
    prompt_tokens = _prompt_tokens(route, body)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n_tokens,
        "total_tokens": prompt_tokens + n_tokens,
    }
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-mock{next(_ids)}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "mock-model"),
        "system_fingerprint": None,
    }
    tokens = [f"tok{i} " for i in range(n_tokens)]

    if not body.get("stream"):
        choice = _choice(chat, False, "".join(tokens), finish)
        obj = {**base, "object": "chat.completion" if chat else "text_completion"}
        obj.update(choices=[choice], usage=usage)
        return web.Response(body=orjson.dumps(obj), content_type="application/json")

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    if include_usage:
        base["usage"] = None  # as OpenAI does: null on every chunk but the last

    def chunk(text: str | None, finish_reason: str | None = None) -> bytes:
        return _sse({**base, "choices": [_choice(chat, True, text, finish_reason)]})

    stats = request.app[STATS_KEY]
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    stats.streams_started += 1
    outcome = "cancelled"
    try:
        await resp.prepare(request)
        if chat:
            await resp.write(chunk(""))  # the role chunk
        if stall_after_first and chat:
            stall_after_first = await _stream_stall(request, stall_after_first)
        delay = 1.0 / b.tokens_per_second if b.tokens_per_second > 0 else 0.0
        for sent in range(n_tokens + 1):
            if sent == b.fail_after_chunks:
                outcome = "failed"
                _reset_connection(request)
                return resp
            if sent == b.stall_after_chunks:
                await _wait_for_disconnect(request)
                return resp
            if sent == n_tokens:
                break
            if delay and sent:
                await asyncio.sleep(delay)
            await resp.write(chunk(tokens[sent]))
            if stall_after_first:  # a text completion's first event is its first token
                stall_after_first = await _stream_stall(request, stall_after_first)
        await resp.write(chunk(None, finish))
        if include_usage:
            await resp.write(_sse({**base, "choices": [], "usage": usage}))
        await resp.write(_DONE)
        await resp.write_eof()
        outcome = "completed"
        return resp
    finally:
        if outcome == "completed":
            stats.streams_completed += 1
        elif outcome == "failed":
            stats.streams_failed += 1
        else:  # client gone: CancelledError, a failed write, or a stall that ended
            stats.streams_cancelled += 1


async def _stream_stall(request: web.Request, seconds: float) -> float:
    """The stream-stall fault: silence for ``seconds``; 0, so that it happens once."""
    _count_fault(request, "stream_stall")
    await asyncio.sleep(seconds)
    return 0.0


def _count_fault(request: web.Request, kind: str) -> None:
    faults = request.app[STATS_KEY].faults
    faults[kind] = faults.get(kind, 0) + 1


def _embedding(item: Any, dim: int) -> list[float]:
    """A deterministic unit vector derived from a hash of the input."""
    seed = orjson.dumps(item)
    raw = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range((dim * 2 + 31) // 32)
    )
    values = [
        (int.from_bytes(raw[2 * i : 2 * i + 2], "little") / 32767.5) - 1.0 for i in range(dim)
    ]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _embeddings(body: dict[str, Any], b: MockBehaviour, stats: MockStats) -> web.Response:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise _BadRequest("'input' must be a non-empty string, list of strings or token lists")
    stats.embedding_calls += 1
    stats.embedding_inputs.append(len(inputs))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector: Any = _embedding(item, b.embedding_dim)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    prompt_tokens = _prompt_tokens("embeddings", body)
    obj = {
        "object": "list",
        "data": data,
        "model": body.get("model", "mock-model"),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "sluice-mock"}],
    }
)


def _api_handler(route: str) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        stats = request.app[STATS_KEY]
        stats.requests += 1
        stats.by_route[route] = stats.by_route.get(route, 0) + 1
        stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        if rid := request.headers.get("x-request-id"):
            stats.request_ids.append(rid)
        draw = request.app[FAULTS_KEY].draw()
        if draw.fault is Fault.DOWN:  # dead: not even the body is read
            _count_fault(request, draw.fault.value)
            _reset_connection(request)
            return web.Response()
        body: Any = None
        try:
            if request.method == "POST":
                try:
                    body = orjson.loads(await request.read())
                except orjson.JSONDecodeError:
                    raise _BadRequest("request body is not valid JSON") from None
                stats.last_body = body
                if not isinstance(body, dict):
                    raise _BadRequest("request body must be a JSON object")
            b = _resolve(request.app[BEHAVIOUR_KEY], request, body)
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request")

        latency = b.latency_ms / 1000 + draw.latency_s
        if latency > 0:
            await asyncio.sleep(latency)
        if draw.fault is not Fault.NONE and (early := await _fault(request, draw)) is not None:
            return early
        if b.reset:
            _reset_connection(request)
            return web.Response()  # never written: the transport is gone
        if b.stall:
            await _wait_for_disconnect(request)
            return web.Response()
        if b.status != 200:
            headers = {"retry-after": "1"} if b.status == 429 else None
            return _error(b.status, f"mock injected status {b.status}", "mock_error", headers)
        if route == "models":
            return web.Response(body=_MODELS, content_type="application/json")
        try:
            if route == "embeddings":
                return _embeddings(body, b, stats)
            return await _completion(request, route, body, b, draw.stream_stall_s)
        except _BadRequest as exc:
            return _error(400, str(exc), "invalid_request")

    return handle


async def _fault(request: web.Request, draw: Draw) -> web.StreamResponse | None:
    """Inject the drawn fault: the answer that replaces the normal one, or None when the
    request goes on (after a stall)."""
    _count_fault(request, draw.fault.value)
    if draw.fault is Fault.RESET:
        _reset_connection(request)
        return web.Response()  # never written: the transport is gone
    if draw.fault is Fault.STALL:
        await asyncio.sleep(draw.stall_s)
        return None
    faults = request.app[FAULTS_KEY].faults
    if draw.fault is Fault.THROTTLE:
        headers = retry_after_headers(faults.retry_after)
        return _error(429, "mock injected fault: rate limited", "mock_fault", headers)
    status = faults.error_status
    return _error(status, f"mock injected fault: status {status}", "mock_fault")


async def _stats(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[STATS_KEY].to_dict()), content_type="application/json"
    )


async def _reset_stats(request: web.Request) -> web.Response:
    request.app[STATS_KEY].reset()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


def _from_loopback(request: web.Request) -> bool:
    try:
        return request.remote is not None and ipaddress.ip_address(request.remote).is_loopback
    except ValueError:
        return False


def _faults_json(faults: MockFaults) -> web.Response:
    return web.Response(body=faults.model_dump_json().encode(), content_type="application/json")


async def _get_faults(request: web.Request) -> web.Response:
    return _faults_json(request.app[FAULTS_KEY].faults)


async def _change_faults(request: web.Request) -> web.Response:
    """POST merges the body's fields over the faults in force; DELETE turns all off."""
    if not _from_loopback(request):
        return _error(403, "fault injection is controlled from loopback only", "forbidden")
    injector = request.app[FAULTS_KEY]
    if request.method == "DELETE":
        injector.set(MockFaults())
        return _faults_json(injector.faults)
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "request body is not valid JSON", "invalid_request")
    try:
        return _faults_json(injector.update(changes))
    except ValueError as exc:
        return _error(400, f"invalid faults: {exc}", "invalid_request")


def build_mock_app(
    behaviour: MockBehaviour | None = None, faults: MockFaults | None = None
) -> web.Application:
    """The mock as an aiohttp app. Run it with ``handler_cancellation=True``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BEHAVIOUR_KEY] = behaviour if behaviour is not None else MockBehaviour()
    app[FAULTS_KEY] = FaultInjector(faults)
    app[STATS_KEY] = MockStats()
    app.router.add_post("/v1/chat/completions", _api_handler("chat/completions"))
    app.router.add_post("/v1/completions", _api_handler("completions"))
    app.router.add_post("/v1/embeddings", _api_handler("embeddings"))
    app.router.add_get("/v1/models", _api_handler("models"))
    app.router.add_get("/mock/stats", _stats)
    app.router.add_post("/mock/reset", _reset_stats)
    app.router.add_get("/mock/faults", _get_faults)
    app.router.add_post("/mock/faults", _change_faults)
    app.router.add_delete("/mock/faults", _change_faults)
    return app


def run_mock_upstream(
    host: str, port: int, behaviour: MockBehaviour, faults: MockFaults | None = None
) -> None:
    """Serve the mock in the foreground until interrupted (``sluice mock-upstream``)."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        build_mock_app(behaviour, faults),
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        loop=loop,
    )


class MockUpstream:
    """The mock on a real loopback socket, served by a background thread's own event loop.

    ``behaviour`` is shared with the running app: mutating it changes later requests.
    ``faults`` are the random faults at start; `set_faults` changes them while it runs.
    """

    def __init__(
        self,
        behaviour: MockBehaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: MockFaults | None = None,
    ) -> None:
        self.behaviour = behaviour if behaviour is not None else MockBehaviour()
        self.host = host
        self.port = port
        self._app = build_mock_app(self.behaviour, faults)
        self.stats: MockStats = self._app[STATS_KEY]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port``, without the ``/v1`` suffix (for ``/mock/*``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def faults(self) -> MockFaults:
        """The random faults in force."""
        return self._app[FAULTS_KEY].faults

    def set_faults(self, **changes: Any) -> MockFaults:
        """Change some faults (`MockFaults` fields) for the requests that arrive next, as
        ``POST /mock/faults`` does; ValueError when they are not valid."""
        return self._app[FAULTS_KEY].update(changes)

    def start(self) -> MockUpstream:
        if self._thread is not None:
            raise RuntimeError("MockUpstream already started")
        self._thread = threading.Thread(target=self._run, name="sluice-mock-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("mock upstream did not start within 10 s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("mock upstream failed to start") from self._error
        return self

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            self._app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
