"""Coalescing: identical requests in flight at once share one upstream call.

The first request with a key leads: it goes upstream as usual. Requests with the same key
that arrive before its answer is complete follow: they wait for that answer instead of
calling the upstream themselves. A complete answer is handed to every follower at once; a
stream is fanned out event by event as it arrives (`Watch`), each follower at its own pace
from a shared buffer, each getting the usage chunk only if it asked for it.

The stream is read by a task of its own, so that a watcher's cancellation (its client
leaving) cannot cut the read short for the others. If the leader's client leaves while
followers still watch it or wait for its end (a follower that asked for a complete
answer), the stream goes on for them, and the leader's request ends with the stream (so
the upstream call it pays for is whole in its usage record); once nobody watches or
waits, the upstream call is aborted.

A leader that fails before its answer starts does not strand its followers: a failure that
is the request's own (the upstream refused it with a 4xx) is their answer too; any other
(the upstream down, the leader cancelled) sends them back to lead or follow again, so one
of them retries. A follower goes round at most `MAX_ROUNDS` times, so a dead upstream is
not called once per follower.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sluice.cache.answer import Answer, usage_event
from sluice.errors import (
    ServiceUnavailableError,
    SluiceError,
    UpstreamConnectError,
    UpstreamStatusError,
)
from sluice.pipeline.failures import judge
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.sse import DONE, event_data, usage_only
from sluice.routing.deployment import Outcome

log = logging.getLogger("sluice.cache")
MAX_ROUNDS = 2
_END = b"\n\n"


class Flight:
    """One upstream call and everyone waiting on it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.answer: Answer | None = None
        """The complete answer, once it is (a stream's once it ended with [DONE])."""
        self.error: SluiceError | None = None
        self.retryable = False
        """The leader failed in a way a follower may retry (not the request's own fault)."""
        self.stream: Streaming | None = None
        """Set once the leader's stream has opened: followers then watch it."""
        self.waiters = 0
        """Followers waiting for the complete answer (they keep a stream going too)."""
        self.alone = False
        """The answer was not for sharing: each follower calls on its own."""
        self._started = asyncio.Event()  # a stream opened, or the end
        self._ended = asyncio.Event()  # a complete answer, or a failure

    async def started(self) -> None:
        """Until there is something to relay: a stream to watch, an answer or a failure."""
        await self._started.wait()

    async def ended(self) -> None:
        """Until the answer is complete, or failed."""
        await self._ended.wait()

    def resolve(self, answer: Answer) -> None:
        self.answer = answer
        self._end()

    def fail(self, error: BaseException) -> None:
        """The leader's call failed: its error is the followers' answer when the request
        itself was refused; otherwise they may go round again (`retryable`)."""
        if isinstance(error, SluiceError):
            self.error = error
            self.retryable = not shared_failure(error)
        else:  # the leader cancelled, or a fault of the gateway's: never shared as such
            self.error = ServiceUnavailableError(
                "The identical request this one waited on did not finish; retry.",
                code="coalesced_request_failed",
            )
            self.retryable = True
        self._end()

    def unshared(self) -> None:
        """The leader's answer is not the followers' (another model answered it, under the
        leader's key's checks): each follower makes its own call (`alone`)."""
        self.alone = True
        self._end()

    def streaming(self, stream: Streaming) -> None:
        self.stream = stream
        self._started.set()

    def _end(self) -> None:
        self._started.set()
        self._ended.set()


def shared_failure(error: BaseException) -> bool:
    """A failure every identical request would meet: the upstream refused the request
    itself (a 4xx that says nothing against the deployment, as `judge` reads it: not 408
    or 429)."""
    return isinstance(error, UpstreamStatusError) and judge(error).outcome is Outcome.OK


class Streaming:
    """A stream read by a task of its own (so that no watcher's cancellation, such as its
    client leaving, can cut the upstream read short for the others) into a buffer that
    every watcher reads at its own pace."""

    def __init__(
        self,
        upstream: StreamReply,
        on_end: Callable[[Streaming], None],
        tokens: Callable[[], tuple[int | None, int | None]],
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self._upstream = upstream
        self._on_end = on_end
        self._waiting = waiting
        self.tokens = tokens
        """The call's prompt and completion tokens (the leader's counts, whole at the end)."""
        self.events: list[bytes] = []
        """Events so far, without their blank-line ends, [DONE] or usage-only chunks."""
        self.usage: bytes | None = None
        """The upstream's usage-only event, when it reached the gateway whole."""
        self.done = False
        self.complete = False
        """Ended with [DONE] (and is therefore storable)."""
        self.error: SluiceError | None = None
        self.watchers = 0
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        self._task = asyncio.create_task(self._pump(), name="coalesced stream")

    async def _pump(self) -> None:
        error: SluiceError | None = None
        try:
            async for data in self._upstream.events:
                self._add(data)
        except asyncio.CancelledError:
            error = _abandoned()  # every watcher left: the call is aborted
        except SluiceError as exc:  # an upstream failure: every watcher relays it
            error = exc
        except Exception:
            error = _abandoned()
            log.exception("a shared stream failed in the gateway")
        finally:
            await self._upstream.close()
            self._finish(error)

    def _add(self, data: bytes) -> None:
        for event in data.split(_END):
            if not event:
                continue
            if event + _END == DONE:  # the relay writes [DONE] one way
                self.complete = True
            elif b'"usage"' in event and usage_only(event_data(event)):
                self.usage = event
            else:
                self.events.append(event)
        self._wake()

    async def changed(self) -> None:
        await self._changed.wait()

    async def ended(self) -> None:
        await self._ended.wait()

    def left(self) -> None:
        """A watcher left: with nobody watching or waiting any more, abort the call."""
        if self.watchers == 0 and self._waiting() == 0 and not self.done:
            self._task.cancel()

    def _finish(self, error: SluiceError | None) -> None:
        self.done = True
        self.error = error
        if error is not None:
            self.complete = False
        self._wake()
        self._ended.set()
        self._on_end(self)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class Watch:
    """One request's view of a shared stream: what it has not yet sent, then its end."""

    def __init__(self, stream: Streaming, *, include_usage: bool, leader: bool) -> None:
        self._stream = stream
        self._include_usage = include_usage
        self._leader = leader
        self._sent = 0
        self._ended = False
        self._closed = False
        stream.watchers += 1

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        while True:
            if self._sent < len(stream.events):
                batch = stream.events[self._sent :]
                self._sent = len(stream.events)
                return _END.join(batch) + _END
            if stream.done:
                if self._ended:
                    raise StopAsyncIteration
                self._ended = True
                if stream.error is not None:
                    raise stream.error.with_traceback(None)  # one error, many watchers
                tail = b""
                if self._include_usage:
                    first = stream.events[0] if stream.events else None
                    tail = (stream.usage or usage_event(first, *stream.tokens())) + _END
                return tail + DONE
            await stream.changed()

    async def close(self) -> None:
        """This request is done with the stream (its end, or its client left). The last
        watcher to leave aborts the call; the leader's request waits for the stream's end,
        so that its usage record has the whole call it paid for."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        stream.watchers -= 1
        stream.left()
        if self._leader:
            await stream.ended()


def _abandoned() -> SluiceError:
    return UpstreamConnectError(
        "The shared upstream stream was closed before it finished.",
        code="upstream_stream_incomplete",
    )
