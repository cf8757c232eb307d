"""SSE relaying against streams cut anywhere, oversized events, and absurd usage numbers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.errors import UpstreamError
from sluice.pipeline.context import RequestContext
from sluice.pipeline.sse import DONE, MAX_EVENT_BYTES, relay_events
from sluice.pipeline.usage import MAX_REPORTED_TOKENS, read_body_usage


async def _chunks(
    parts: Iterable[bytes], consumed: list[int] | None = None
) -> AsyncIterator[bytes]:
    for part in parts:
        if consumed is not None:
            consumed.append(len(part))
        yield part


async def _relay(parts: Iterable[bytes], *, strip_usage: bool) -> tuple[bytes, RequestContext]:
    ctx = RequestContext("rid", time.perf_counter())
    out = [data async for data in relay_events(_chunks(parts), ctx, strip_usage=strip_usage)]
    return b"".join(out), ctx


def _run(parts: Iterable[bytes], *, strip_usage: bool) -> tuple[bytes, RequestContext]:
    return asyncio.run(_relay(parts, strip_usage=strip_usage))


def _cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# A stream as an upstream writes it: content events (some with an event: line), a usage
# chunk, [DONE]; each event ends with \n\n or \r\n\r\n and lines inside with \n or \r\n.
_text = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=40)
_event = st.builds(
    lambda text, named, crlf: (
        ((b"event: delta\r\n" if crlf else b"event: delta\n") if named else b"")
        + b"data: "
        + orjson.dumps({"choices": [{"delta": {"content": text}}]})
    ),
    _text,
    st.booleans(),
    st.booleans(),
)
_stream = st.tuples(
    st.lists(st.tuples(_event, st.sampled_from([b"\n\n", b"\r\n\r\n"])), max_size=8),
    st.integers(0, 5000),
    st.integers(0, 5000),
)


def _compose(events: list[tuple[bytes, bytes]], prompt: int, completion: int) -> bytes:
    usage = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    body = b"".join(event + end for event, end in events)
    return body + b"data: " + orjson.dumps(usage) + b"\n\n" + DONE


def _expected(events: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(event + b"\n\n" for event, _ in events) + DONE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_stream, data=st.data())
def test_events_survive_any_cutting(
    stream: tuple[list[tuple[bytes, bytes]], int, int], data: st.DataObject
) -> None:
    events, prompt, completion = stream
    raw = _compose(events, prompt, completion)
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    relayed, ctx = _run(_cut(raw, points), strip_usage=True)
    assert relayed == _expected(events)
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (prompt, completion)
    assert ctx.content_events == len(events)


def test_every_single_and_byte_by_byte_cut() -> None:
    events = [
        (
            b"data: " + orjson.dumps({"choices": [{"delta": {"content": "h\u00e9llo"}}]}),
            b"\r\n\r\n",
        ),
        (b"event: delta\r\ndata: {}", b"\n\n"),
        (b"data: " + orjson.dumps({"choices": [{"delta": {"content": "!"}}]}), b"\n\n"),
    ]
    raw = _compose(events, 7, 3)
    cuts = [[i] for i in range(len(raw) + 1)] + [list(range(len(raw) + 1))]
    for points in cuts:
        relayed, ctx = _run(_cut(raw, points), strip_usage=False)
        usage_event = raw[raw.index(b'data: {"choices":[],') : raw.index(DONE)]
        assert relayed == _expected(events)[: -len(DONE)] + usage_event + DONE, points
        assert (ctx.prompt_tokens, ctx.completion_tokens) == (7, 3)


def test_an_event_that_never_ends_fails_the_stream_at_the_cap() -> None:
    consumed: list[int] = []
    piece = b"x" * 65536
    parts = [b"data: "] + [piece] * 64  # 4 MiB without a delimiter

    async def relay() -> None:
        ctx = RequestContext("rid", time.perf_counter())
        async for _ in relay_events(_chunks(parts, consumed), ctx, strip_usage=False):
            pass

    with pytest.raises(UpstreamError) as caught:
        asyncio.run(relay())
    assert caught.value.code == "upstream_event_too_large"
    assert sum(consumed) <= MAX_EVENT_BYTES + len(piece) + 6  # read no further than the cap


def test_a_long_event_in_small_chunks_is_framed_in_linear_time() -> None:
    # 1 MiB less a little, 100 bytes at a time, then its end: re-scanning everything that
    # is pending on every chunk (quadratic) takes seconds here; scanning only new bytes, ms.
    size = MAX_EVENT_BYTES - 4096
    parts = [b"data: "] + [b"y" * 100] * (size // 100) + [b"\n\n", DONE]
    started = time.perf_counter()
    relayed, _ = _run(parts, strip_usage=False)
    elapsed = time.perf_counter() - started
    assert len(relayed) == 6 + (size // 100) * 100 + 2 + len(DONE)
    assert elapsed < 1.0, elapsed


ABSURD: list[object] = [
    -5,
    2**31,
    2**63,
    MAX_REPORTED_TOKENS,
    12.5,
    1e3,
    "12",
    True,
    None,
    [1],
    {"n": 1},
]


@pytest.mark.parametrize("value", ABSURD, ids=repr)
def test_absurd_usage_in_a_stream_counts_as_unknown(value: object) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": value, "completion_tokens": value}}
    raw = b"data: {}\n\ndata: " + orjson.dumps(usage) + b"\n\n" + DONE
    _, ctx = _run([raw], strip_usage=True)
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (None, None)
    assert ctx.content_events == 1  # the estimate the accounting falls back on


def test_a_huge_integer_in_a_stream_counts_as_unknown() -> None:
    huge = b"9" * 5000  # orjson refuses it: the event is not usage, the count stays unknown
    raw = b'data: {"choices": [], "usage": {"prompt_tokens": ' + huge + b"}}\n\n" + DONE
    _, ctx = _run([raw], strip_usage=True)
    assert ctx.prompt_tokens is None


@pytest.mark.parametrize(
    "value",
    [b"-5", b"2147483648", b"12.5", b"1e3", b"12E2", b'"12"', b"true", b"null", b"9" * 5000],
    ids=lambda v: v[:12].decode(),
)
def test_absurd_usage_in_a_body_counts_as_unknown(value: bytes) -> None:
    ctx = RequestContext("rid", 0.0)
    body = b'{"choices": [], "usage": {"prompt_tokens": %s, "completion_tokens": %s}}' % (
        value,
        value,
    )
    read_body_usage(body, ctx)  # a 5000-digit count used to raise ValueError here (a 500)
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (None, None)


def test_plausible_usage_in_a_body_is_read() -> None:
    ctx = RequestContext("rid", 0.0)
    read_body_usage(b'{"usage": {"prompt_tokens": 12, "completion_tokens":7}}', ctx)
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (12, 7)
    embedding = RequestContext("rid", 0.0)
    read_body_usage(b'{"usage": {"prompt_tokens": 9, "total_tokens": 9}}', embedding)
    assert (embedding.prompt_tokens, embedding.completion_tokens) == (9, 0)
