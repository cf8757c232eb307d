"""Turn an OpenAI chat/completions request body into engine requests, validating each field.

Three steps, so that the costly one can leave the event loop:

1. `validate` checks every field and every bound without tokenizing anything: the
   sequences one request expands into (prompts x ``n``), the number and length of prompts
   and messages, the range of every number. Cheap; runs on the event loop.
2. `tokenize` renders the chat template and tokenizes, stopping at the first prompt that
   cannot fit. The backend runs it on the engine's tokenizer thread when the text is large
   (`Draft.chars`).
3. `build` checks prompt plus completion against the context and makes one engine
   request per choice, at the priority the caller's key gives.

`parse` chains the three, inline. Every refusal is an `InvalidRequestError` naming the
offending field (``param``), or a `ContextLengthExceededError` when prompt plus completion
do not fit a sequence's context. Fields the local model cannot honour but that do not
change the answer's shape (penalties, ``user``, ``response_format``, a valid
``logit_bias``…) are accepted and ignored; so is a body ``priority`` (a vLLM extension):
the queue order is the key's, never the client's.

A field the request omits takes the deployment's `RequestDefaults` (temperature, top_p,
top_k, max_tokens, a system prompt put first in a chat that has none); a value the request
gives always wins. A default ``max_tokens`` is cut to what the context has left after the
prompt, where a client's own is refused when it does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sluice.engine.types import GenerationRequest, RequestLimits
from sluice.errors import ContextLengthExceededError, InvalidRequestError

Kind = Literal["chat", "text"]
MAX_N = 128
MAX_STOPS = 4
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 300
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestDefaults:
    """A deployment's answers for the fields a request omits (docs/local-model.md).

    The bare defaults are OpenAI's: temperature 1, top_p 1, the rest of the context, and
    no system prompt but the chat template's own."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample among the k likeliest tokens only; 0: all of them."""
    max_tokens: int | None = None
    """Completion tokens when the request gives none; None: the rest of the context."""
    system_prompt: str | None = None
    """Put first, as a system message, in a chat with no system or developer message."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be greater than 0 and at most 1")
        if not 0 <= self.top_k <= INT32_MAX:
            raise ValueError("top_k must be at least 0 and below 2**31")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")


NO_DEFAULTS = RequestDefaults()
_SYSTEM_ROLES = frozenset({"system", "developer"})


class Tokenizer(Protocol):
    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...


@dataclass(slots=True)
class Draft:
    """A validated request whose prompts are not tokenized yet."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    n: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    max_tokens: int | None
    """The client's max_tokens (or max_completion_tokens); None: the default."""
    default_max_tokens: int | None
    """The deployment's default, cut to the context left; None: the rest of the context."""
    limits: RequestLimits
    prompt_param: str
    texts: list[str] = field(default_factory=list)
    """Completion prompts given as text."""
    token_prompts: list[list[int]] = field(default_factory=list)
    """Completion prompts given as token ids (nothing to tokenize)."""
    messages: list[dict[str, Any]] | None = None
    """A chat conversation, reduced to what the template may see."""
    chars: int = 0
    """Characters to render and tokenize: how much work `tokenize` has to do."""


@dataclass(slots=True)
class Job:
    """A parsed request: one engine request per choice, in choice-index order."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    """Usage's prompt_tokens: each distinct prompt counted once (not once per choice)."""
    requests: list[GenerationRequest] = field(default_factory=list)


def parse(
    kind: Kind,
    body: Mapping[str, Any],
    tok: Tokenizer,
    limits: RequestLimits,
    priority: int = 0,
    defaults: RequestDefaults = NO_DEFAULTS,
) -> Job:
    """Validate `body`, tokenize its prompts and build the engine requests, inline."""
    draft = validate(kind, body, limits, defaults)
    return build(draft, tokenize(draft, tok), priority)


def validate(
    kind: Kind,
    body: Mapping[str, Any],
    limits: RequestLimits,
    defaults: RequestDefaults = NO_DEFAULTS,
) -> Draft:
    """Every check that needs no tokenizer, cheapest first; nothing here scales with the
    body before its size has been bounded. Omitted fields take `defaults`."""
    n = _int(body, "n", 1, low=1, high=MAX_N)
    temperature = _number(body, "temperature", defaults.temperature, low=0.0, high=2.0)
    top_p = _number(body, "top_p", defaults.top_p, low=0.0, high=1.0)
    if top_p == 0.0:
        raise InvalidRequestError("top_p must be greater than 0", param="top_p")
    top_k = _int(body, "top_k", defaults.top_k, low=0, high=INT32_MAX)
    seed = _optional_int(body, "seed", low=INT64_MIN, high=INT64_MAX)
    stop = _stop(body)
    stream = _bool(body, "stream", False)
    include_usage = _include_usage(body, stream)
    for name in ("logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise InvalidRequestError(f"{name} is not supported by this model", param=name)
    if body.get("tools"):
        raise InvalidRequestError("tools are not supported by this model", param="tools")
    _logit_bias(body, limits.n_vocab)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_param = "max_completion_tokens"
    else:
        max_param = "max_tokens"
    max_tokens = _optional_int(body, max_param, low=1)
    if max_tokens is not None and max_tokens >= limits.n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {limits.n_ctx} tokens, which must hold "
            f"the prompt and the {max_param}. Please reduce {max_param}.",
            param=max_param,
        )
    model = body.get("model")
    draft = Draft(
        kind=kind,
        model=model if isinstance(model, str) else "",
        stream=stream,
        include_usage=include_usage,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        max_tokens=max_tokens,
        default_max_tokens=defaults.max_tokens,
        limits=limits,
        prompt_param="messages" if kind == "chat" else "prompt",
    )
    if kind == "chat":
        _sequences(1, n, limits)
        draft.messages, draft.chars = _messages(body, limits)
        system = defaults.system_prompt
        if system and not any(m["role"] in _SYSTEM_ROLES for m in draft.messages):
            draft.messages.insert(0, {"role": "system", "content": system})
            draft.chars += len(system) + 16
    else:
        _prompts(body, draft)
    return draft


def tokenize(draft: Draft, tok: Tokenizer) -> list[list[int]]:
    """The token ids of every prompt; refuses the first that cannot fit the context."""
    limits = draft.limits
    if draft.messages is not None:
        text = tok.render_chat(draft.messages)
        if len(text) > limits.max_prompt_chars:
            raise _too_long(limits.n_ctx, draft.prompt_param)
        # Each special token's text is one token: more than the context holds cannot fit,
        # and llama.cpp's special-token pass grows quadratically with their number.
        if sum(text.count(special) for special in limits.special_texts) > limits.n_ctx:
            raise _too_long(limits.n_ctx, draft.prompt_param)
        prompts = [tok.tokenize(text, add_special=False, parse_special=True)]
    elif draft.texts:
        prompts = []
        for text in draft.texts:
            prompt = tok.tokenize(text)
            if len(prompt) + max(draft.max_tokens or 1, 1) > limits.n_ctx:
                raise _context_error(len(prompt), draft.max_tokens or 1, draft)
            prompts.append(prompt)
    else:
        prompts = draft.token_prompts
    if any(not p for p in prompts):
        raise InvalidRequestError(
            f"{draft.prompt_param} must not be empty", param=draft.prompt_param
        )
    return prompts


def build(draft: Draft, prompts: list[list[int]], priority: int = 0) -> Job:
    """One engine request per prompt and choice, admitted at `priority` (the key's)."""
    n_ctx = draft.limits.n_ctx
    job = Job(draft.kind, draft.model, draft.stream, draft.include_usage, 0)
    for prompt in prompts:
        max_tokens = draft.max_tokens
        if max_tokens is None:  # the default, cut to what the context has left
            max_tokens = n_ctx - len(prompt)
            if draft.default_max_tokens is not None:
                max_tokens = min(max_tokens, draft.default_max_tokens)
        if len(prompt) + max(max_tokens, 1) > n_ctx:
            raise _context_error(len(prompt), max_tokens, draft)
        job.prompt_tokens += len(prompt)
        for j in range(draft.n):
            job.requests.append(
                GenerationRequest(
                    prompt_tokens=prompt,
                    max_tokens=max_tokens,
                    temperature=draft.temperature,
                    top_p=draft.top_p,
                    top_k=draft.top_k,
                    # Distinct choices need distinct draws, reproducibly under one seed.
                    seed=None if draft.seed is None else draft.seed + j,
                    stop=draft.stop,
                    priority=priority,
                )
            )
    return job


def _context_error(n_prompt: int, max_tokens: int, draft: Draft) -> ContextLengthExceededError:
    n_ctx, param = draft.limits.n_ctx, draft.prompt_param
    return ContextLengthExceededError(
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the "
        f"completion). Please reduce the length of the {param} or completion.",
        param=param,
    )


def _too_long(n_ctx: int, param: str) -> ContextLengthExceededError:
    return ContextLengthExceededError(
        f"This model's maximum context length is {n_ctx} tokens, and the {param} is longer "
        f"than that. Please reduce the length of the {param}.",
        param=param,
    )


def _sequences(prompts: int, n: int, limits: RequestLimits) -> None:
    """Refuse a request that would expand into more sequences than one request may run."""
    if prompts * n > limits.max_sequences:
        raise InvalidRequestError(
            f"This model runs at most {limits.max_sequences} sequences per request (prompts "
            f"x n); this request asks for {prompts} x {n}.",
            param="n" if n > 1 else "prompt",
        )


def _messages(body: Mapping[str, Any], limits: RequestLimits) -> tuple[list[dict[str, Any]], int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty array", param="messages")
    # Every message costs the template at least its role markers: more messages (or
    # content parts) than the context has tokens cannot fit, so they are never rendered.
    if len(messages) > limits.n_ctx:
        raise _too_long(limits.n_ctx, "messages")
    out: list[dict[str, Any]] = []
    parts = chars = 0
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequestError(
                f"messages[{i}] must be an object with a valid role", param=f"messages[{i}].role"
            )
        content, n_parts = _content(message.get("content"), i)
        parts += n_parts
        if parts > limits.n_ctx:
            raise _too_long(limits.n_ctx, "messages")
        # The template sees only what the model can use: tools are refused, so are
        # tool calls; anything else could only make the template do more work.
        reduced = {"role": role, "content": content}
        name = message.get("name")
        if isinstance(name, str):
            reduced["name"] = name
            chars += len(name)
        chars += len(content)
        out.append(reduced)
    return out, chars + 16 * len(out)


def _content(content: Any, i: int) -> tuple[str, int]:
    """The text of a message's content, and how many parts it had."""
    if content is None or isinstance(content, str):
        return content or "", 1
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            text = part.get("text") if is_text else None
            if not isinstance(text, str):
                raise InvalidRequestError(
                    "only text content parts are supported by this model",
                    param=f"messages[{i}].content",
                )
            texts.append(text)
        return "".join(texts), len(content)
    raise InvalidRequestError(
        "content must be a string or an array of parts", param=f"messages[{i}].content"
    )


def _prompts(body: Mapping[str, Any], draft: Draft) -> None:
    """Fill the draft's completion prompts, bounding count and size before reading each."""
    limits = draft.limits
    prompt = body.get("prompt")
    shape_error = InvalidRequestError(
        "prompt must be a string, an array of strings, or token arrays", param="prompt"
    )
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
        kind: type = str
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            prompts, kind = prompt, str
        elif _is_int(first):
            prompts, kind = [prompt], list  # one prompt given as token ids
        elif isinstance(first, list):
            prompts, kind = prompt, list
        else:
            raise shape_error
    else:
        raise shape_error
    _sequences(len(prompts), draft.n, limits)
    if kind is str:
        if not all(isinstance(p, str) for p in prompts):
            raise shape_error
        if any(len(p) > limits.max_prompt_chars for p in prompts):
            raise _too_long(limits.n_ctx, "prompt")
        draft.texts = prompts
        draft.chars = sum(len(p) for p in prompts)
        return
    for tokens in prompts:
        if not isinstance(tokens, list) or not tokens:
            raise shape_error
        if len(tokens) >= limits.n_ctx:
            raise _too_long(limits.n_ctx, "prompt")
        if not all(type(t) is int for t in tokens):  # not bool, not float
            raise shape_error
        if min(tokens) < 0 or max(tokens) >= limits.n_vocab:
            raise InvalidRequestError(
                f"token ids must be between 0 and {limits.n_vocab - 1}", param="prompt"
            )
    draft.token_prompts = [list(p) for p in prompts]


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list):
        if len(stop) > MAX_STOPS:
            raise InvalidRequestError(f"stop accepts at most {MAX_STOPS} strings", param="stop")
        stops = stop
    else:
        stops = None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop must be a string or an array of strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequestError(
            f"each stop string must be at most {MAX_STOP_CHARS} characters", param="stop"
        )
    return tuple(s for s in stops if s)


def _logit_bias(body: Mapping[str, Any], n_vocab: int) -> None:
    """Check ``logit_bias`` as OpenAI would (it is then ignored: no sampler for it yet)."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must be an object", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias accepts at most {MAX_LOGIT_BIAS} tokens", param="logit_bias"
        )
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias")
        if int(key) >= n_vocab:
            raise InvalidRequestError(
                f"logit_bias token ids must be below {n_vocab}", param="logit_bias"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError("logit_bias values must be numbers", param="logit_bias")
        if not -100 <= value <= 100:
            raise InvalidRequestError(
                "logit_bias values must be between -100 and 100", param="logit_bias"
            )


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    if not stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise InvalidRequestError(
            "include_usage must be a boolean", param="stream_options.include_usage"
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(
    body: Mapping[str, Any], name: str, *, low: int | None = None, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequestError(f"{name} must be an integer", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequestError(f"{name} must be {bounds}", param=name)
    return int(value)


def _int(
    body: Mapping[str, Any],
    name: str,
    default: int,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int:
    value = _optional_int(body, name, low=low, high=high)
    return default if value is None else value


def _number(
    body: Mapping[str, Any], name: str, default: float, *, low: float, high: float
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low:g} and {high:g}", param=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean", param=name)
    return value
