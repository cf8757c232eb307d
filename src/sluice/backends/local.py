"""Backend over the in-process engine: OpenAI chat/completions served by llama.cpp.

The request body is validated field by field (`sluice.backends.local_params`) and bounded
before anything is tokenized; a large prompt is rendered and tokenized on the engine's
tokenizer thread, never on the event loop. Each choice becomes one engine sequence (so
``n`` choices decode concurrently), queued at the priority of the caller's key (never a
priority from the body), and the answer is an exact OpenAI object or an SSE stream of
chunks. Engine failures are translated here, at the boundary: a full queue is 429 with
Retry-After, a queue timeout or a stopped engine 503, a failure after the first streamed
byte an `UpstreamError` the relay turns into an SSE error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.local_params import (
    NO_DEFAULTS,
    Job,
    Kind,
    RequestDefaults,
    build,
    tokenize,
    validate,
)
from sluice.backends.local_render import DONE, Choice, Renderer
from sluice.engine.chat_template import ChatTemplateError
from sluice.engine.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.engine.metrics import EngineMetrics
from sluice.engine.sequence import GenerationStream
from sluice.engine.types import (
    EngineClosedError,
    EngineError,
    GenerationEvent,
    PromptTooLongError,
    QueueFullError,
    QueueTimeoutError,
    SequenceTracer,
)
from sluice.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    SluiceError,
    UpstreamError,
)

_RETRY = {"Retry-After": "1"}
# Up to this many characters of prompt are rendered and tokenized inline: below it the
# hand-off to the tokenizer thread costs about as much as the work (docs/security/engine.md).
INLINE_CHARS = 512


def translate(exc: BaseException) -> SluiceError:
    """The client-facing error for an engine failure before the first byte."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, QueueFullError):
        return RateLimitError(
            "The local model is at capacity; retry shortly.",
            code="engine_queue_full",
            headers=_RETRY,
        )
    if isinstance(exc, QueueTimeoutError):
        return ServiceUnavailableError(
            "The local model is overloaded: no slot freed up in time.",
            code="engine_queue_timeout",
            headers=_RETRY,
        )
    if isinstance(exc, EngineClosedError):
        return ServiceUnavailableError("The local model is not running.", headers=_RETRY)
    if isinstance(exc, PromptTooLongError):
        return ContextLengthExceededError(str(exc), param="messages")
    if isinstance(exc, ChatTemplateError):
        return InvalidRequestError(str(exc), param="messages")
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc), param="prompt")
    return UpstreamError(f"The local model failed: {exc}", code="local_engine_error")


async def merge(
    streams: list[GenerationStream],
) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    """Events of several choices as they come, tagged with the choice index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.cancel()


class LocalBackend:
    """Serves ``chat/completions`` and ``completions`` from an in-process `Engine`."""

    def __init__(
        self,
        name: str,
        config: EngineConfig,
        metrics: EngineMetrics | None = None,
        tracer: SequenceTracer | None = None,
        defaults: RequestDefaults = NO_DEFAULTS,
    ) -> None:
        self.name = name
        self.engine = Engine(config, metrics)
        self._tracer = tracer
        self.defaults = defaults
        """What a request that omits sampling, max_tokens or a system message gets."""

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def _job(self, call: UpstreamCall) -> Job:
        if call.route == "embeddings":
            raise InvalidRequestError(
                "This model is a chat model and does not create embeddings.", param="model"
            )
        engine = self.engine
        try:
            kind: Kind = "chat" if call.route == "chat/completions" else "text"
            draft = validate(kind, call.body, engine.request_limits, self.defaults)
            if draft.chars > INLINE_CHARS:
                prompts = await engine.offload(tokenize, draft, engine)
            else:
                prompts = tokenize(draft, engine)
        except (ChatTemplateError, EngineError) as exc:
            raise translate(exc) from exc
        return build(draft, prompts, call.priority)

    def _submit(self, job: Job) -> list[GenerationStream]:
        streams: list[GenerationStream] = []
        try:
            for request in job.requests:
                streams.append(self.engine.generate(request))
        except Exception as exc:
            for stream in streams:
                stream.cancel()
            raise translate(exc) from exc
        return streams

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        job = await self._job(call)
        renderer = Renderer(job)
        choices = [Choice() for _ in job.requests]
        streams = self._submit(job)
        parent = self._tracer.capture() if self._tracer is not None else None
        events = merge(streams)
        try:
            async for index, event in events:
                choice = choices[index]
                choice.text.append(event.text)
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    choice.completion_tokens = event.tokens
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            await events.aclose()
            if parent is not None:
                self._trace(parent, streams)
        return UpstreamReply(200, renderer.completion(choices))

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        job = await self._job(call)
        streams = self._submit(job)
        parent = self._tracer.capture() if self._tracer is not None else None
        events = merge(streams)
        try:
            try:
                first = await anext(events)
            except StopAsyncIteration:  # pragma: no cover - every sequence ends with an event
                raise UpstreamError("The local model produced nothing.") from None
            except Exception as exc:
                raise translate(exc) from exc
            yield self._sse(Renderer(job), first, events)
        finally:
            await events.aclose()
            if parent is not None:
                self._trace(parent, streams)

    def _trace(self, parent: object, streams: list[GenerationStream]) -> None:
        assert self._tracer is not None
        for stream in streams:
            self._tracer.record(parent, stream.timing())

    async def _sse(
        self,
        renderer: Renderer,
        first: tuple[int, GenerationEvent],
        events: AsyncIterator[tuple[int, GenerationEvent]],
    ) -> AsyncIterator[bytes]:
        started: set[int] = set()
        completion_tokens = 0

        def chunk(index: int, event: GenerationEvent) -> bytes:
            nonlocal completion_tokens
            out = b""
            if index not in started:
                started.add(index)
                out += renderer.role_chunk(index)
            if event.text or event.finish_reason is None:
                out += renderer.text_chunk(index, event.text)
            if event.finish_reason is not None:
                out += renderer.text_chunk(index, "", event.finish_reason)
                completion_tokens += event.tokens
            return out

        yield chunk(*first)
        try:
            async for index, event in events:
                yield chunk(index, event)
        except EngineError as exc:
            raise UpstreamError(
                f"The local model failed mid-stream: {exc}", code="local_engine_error"
            ) from exc
        if renderer.job.include_usage:
            yield renderer.usage_chunk(completion_tokens)
        yield DONE
