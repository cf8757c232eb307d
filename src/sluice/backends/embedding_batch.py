"""Micro-batching of embedding calls to one upstream: many concurrent requests, one call.

Requests whose options agree (everything but ``input``: model, encoding_format,
dimensions, user…) are gathered by a `MicroBatcher` for up to ``max_wait_ms`` and sent as
one upstream request whose ``input`` is the concatenation of theirs; the upstream's
``data`` is split back by position, re-indexed from 0 for each caller, and its
``prompt_tokens`` shared out in proportion to the size of each caller's inputs (the upstream
reports only the total). A batch the upstream refuses with a 4xx is retried one request at a
time, so only the request at fault gets the error; any other failure reaches every caller
of the batch. A batch of one is sent untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.microbatch import MicroBatcher
from sluice.errors import UpstreamError, UpstreamStatusError
from sluice.settings import EmbeddingBatchSettings

Send = Callable[[UpstreamCall], Awaitable[UpstreamReply]]
_MAX_OPTION_GROUPS = 64


@dataclass(slots=True, frozen=True)
class _Job:
    call: UpstreamCall
    inputs: list[Any]


class EmbeddingBatcher:
    def __init__(self, send: Send, settings: EmbeddingBatchSettings) -> None:
        self._send = send
        self._settings = settings
        self._batchers: dict[bytes, MicroBatcher[_Job, UpstreamReply]] = {}
        self.upstream_calls = 0

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        options = {k: v for k, v in call.body.items() if k != "input"}
        group = orjson.dumps(options, option=orjson.OPT_SORT_KEYS)
        batcher = self._batchers.get(group)
        if batcher is None:
            if len(self._batchers) >= _MAX_OPTION_GROUPS:
                return await self._counted_send(call)  # too many distinct option sets
            batcher = MicroBatcher(
                self._process,
                max_batch_size=self._settings.max_batch_size,
                max_wait_s=self._settings.max_wait_ms / 1000,
                max_batch_cost=self._settings.max_batch_size,
                cost=lambda job: len(job.inputs),
            )
            self._batchers[group] = batcher
        return await batcher.submit(_Job(call, _as_list(call.body["input"])))

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()

    async def _counted_send(self, call: UpstreamCall) -> UpstreamReply:
        self.upstream_calls += 1
        return await self._send(call)

    async def _process(self, jobs: list[_Job]) -> list[UpstreamReply | BaseException]:
        if len(jobs) == 1:
            return [await _outcome(self._counted_send(jobs[0].call))]
        first = jobs[0].call
        merged = UpstreamCall(
            route="embeddings",
            body={**first.body, "input": [item for job in jobs for item in job.inputs]},
            raw=None,
            request_id=f"{first.request_id}-batch{len(jobs)}",
            headers=first.headers,
        )
        try:
            reply = await self._counted_send(merged)
        except UpstreamStatusError as exc:
            if 400 <= exc.upstream_status < 500:
                # One bad request spoils the batch: let each one hear its own answer.
                return [await _outcome(self._counted_send(job.call)) for job in jobs]
            return [exc] * len(jobs)
        except UpstreamError as exc:
            return [exc] * len(jobs)
        return _split(reply, jobs)


async def _outcome(reply: Awaitable[UpstreamReply]) -> UpstreamReply | BaseException:
    try:
        return await reply
    except UpstreamError as exc:
        return exc


def _as_list(value: Any) -> list[Any]:
    """One request's inputs as a list: a string or a token list is a single input."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


def _split(reply: UpstreamReply, jobs: list[_Job]) -> list[UpstreamReply | BaseException]:
    try:
        parsed = orjson.loads(reply.body)
        data = sorted(parsed["data"], key=lambda item: item["index"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        error = UpstreamError(f"upstream returned an unreadable embeddings body ({exc})")
        return [error] * len(jobs)
    if len(data) != sum(len(job.inputs) for job in jobs):
        error = UpstreamError("upstream returned a different number of embeddings than inputs")
        return [error] * len(jobs)
    sizes = [sum(len(item) for item in job.inputs) or 1 for job in jobs]
    prompt_tokens = int((parsed.get("usage") or {}).get("prompt_tokens") or 0)
    shares = _apportion(prompt_tokens, sizes)
    replies: list[UpstreamReply | BaseException] = []
    offset = 0
    for job, tokens in zip(jobs, shares, strict=True):
        mine = data[offset : offset + len(job.inputs)]
        offset += len(job.inputs)
        body = {
            "object": "list",
            "data": [{**item, "index": i} for i, item in enumerate(mine)],
            "model": parsed.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        replies.append(UpstreamReply(reply.status, orjson.dumps(body), reply.content_type))
    return replies


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Integer shares of ``total`` in proportion to ``weights`` that add up exactly."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares
