"""What a failed attempt means: for the deployment's health, and for the request.

    failure                                   health      next
    DeploymentBusyError (load shedding)       no verdict  another candidate; no call was made
    connect error, reset, timeout             FAILED      retry (another deployment at once,
    upstream 5xx, 408                         FAILED        the same one after a backoff)
    upstream 429, engine queue full           THROTTLED   retry (the same one no sooner than
                                                            its Retry-After)
    upstream 5xx, 408 or 429 with its         (as above)  another deployment, never this one
      ``x-should-retry: false``
    engine stopped or overloaded (503)        FAILED      retry
    upstream 401/403 (credentials refused)    FAILED      another deployment, never this one
    any other upstream failure (a body too    FAILED      another deployment, never this one
      large, a bad encoding, an engine error)
    context window exceeded                   OK          the context-window fallbacks
    content refused by the upstream's policy  OK          the content-policy fallbacks
    any other 4xx (the client's request)      OK          none: relayed to the client

Every row is a failure before the client's first byte: the attempts step only sees errors
raised before a reply is handed back (a stream's first event included, `sluice.pipeline.
backend`). An upstream's 400 is read (only then) for OpenAI's ``context_length_exceeded``,
``content_policy_violation`` and Azure's ``content_filter`` codes, and for the messages
vLLM and llama.cpp's server use for a prompt over the context window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

from sluice.errors import (
    ContextLengthExceededError,
    DeploymentBusyError,
    RateLimitError,
    ServiceUnavailableError,
    SluiceError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    retry_after_seconds,
)
from sluice.routing.deployment import Outcome


class Next(enum.Enum):
    RETRY = "retry"
    """Safe to repeat: any other deployment at once, this one after a backoff."""
    ELSEWHERE = "elsewhere"
    """Another deployment or a fallback model, never this deployment again."""
    CONTEXT_WINDOW = "context_window"
    CONTENT_POLICY = "content_policy"
    BUSY = "busy"
    """No upstream call was made: the next candidate, at once and free of charge."""
    ANSWER = "answer"
    """The client's answer, relayed as it is."""


@dataclass(frozen=True, slots=True)
class Failure:
    error: SluiceError
    outcome: Outcome
    next: Next
    responded: bool
    """An answer came back (its time is the deployment's time to first byte)."""
    retry_after: float | None = None
    unreachable: bool = False
    """The upstream could not be reached or dropped the connection before answering: when
    every call of a request failed so, its deployments are down (a 503, not a 502)."""


_CONTEXT_CODES = frozenset({"context_length_exceeded"})
_CONTEXT_TYPES = frozenset({"exceed_context_size_error"})  # llama.cpp's server
_CONTEXT_MESSAGES = ("maximum context length", "context length exceeded")
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter"})
_POLICY_INNER_CODES = frozenset({"ResponsibleAIPolicyViolation"})  # Azure's innererror


def judge(error: SluiceError) -> Failure:
    if isinstance(error, DeploymentBusyError):
        return Failure(error, Outcome.NO_VERDICT, Next.BUSY, responded=False)
    if isinstance(error, UpstreamStatusError):
        return _judge_status(error)
    if isinstance(error, UpstreamConnectError):
        return Failure(error, Outcome.FAILED, Next.RETRY, responded=False, unreachable=True)
    if isinstance(error, UpstreamTimeoutError):
        down = error.code == "upstream_connect_timeout"
        return Failure(error, Outcome.FAILED, Next.RETRY, responded=False, unreachable=down)
    if isinstance(error, UpstreamAuthError):
        return Failure(error, Outcome.FAILED, Next.ELSEWHERE, responded=True)
    if isinstance(error, UpstreamError):
        return Failure(error, Outcome.FAILED, Next.ELSEWHERE, responded=True)
    if isinstance(error, ContextLengthExceededError):
        return Failure(error, Outcome.OK, Next.CONTEXT_WINDOW, responded=True)
    if isinstance(error, RateLimitError):  # the embedded engine's full queue
        wait = retry_after_seconds(error.headers.get("Retry-After"))
        return Failure(error, Outcome.THROTTLED, Next.RETRY, True, wait)
    if isinstance(error, ServiceUnavailableError):  # the embedded engine stopped or overloaded
        return Failure(error, Outcome.FAILED, Next.RETRY, responded=True)
    return Failure(error, Outcome.OK, Next.ANSWER, responded=True)


def _judge_status(error: UpstreamStatusError) -> Failure:
    status = error.upstream_status
    # An upstream's "x-should-retry: false" (OpenAI's) is honoured for the deployment that
    # sent it: never called again for this request, though another one may serve it.
    again = Next.ELSEWHERE if error.should_retry is False else Next.RETRY
    if status == 429:
        return Failure(error, Outcome.THROTTLED, again, True, error.retry_after)
    if status >= 500 or status == 408:
        return Failure(error, Outcome.FAILED, again, True, error.retry_after)
    if status == 400:
        refused = _refusal(error.upstream_body)
        if refused is not None:
            return Failure(error, Outcome.OK, refused, responded=True)
    return Failure(error, Outcome.OK, Next.ANSWER, responded=True)


def _refusal(body: bytes) -> Next | None:
    """CONTEXT_WINDOW or CONTENT_POLICY when an error body says so; None otherwise."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if not isinstance(error, dict):
        error = parsed  # vLLM's errors are not wrapped in "error"
    code = error.get("code")
    if isinstance(code, str):
        if code in _CONTEXT_CODES:
            return Next.CONTEXT_WINDOW
        if code in _POLICY_CODES:
            return Next.CONTENT_POLICY
    inner = error.get("innererror")
    if isinstance(inner, dict) and _text(inner.get("code")) in _POLICY_INNER_CODES:
        return Next.CONTENT_POLICY
    if _text(error.get("type")) in _CONTEXT_TYPES:
        return Next.CONTEXT_WINDOW
    message = error.get("message")
    if isinstance(message, str) and any(m in message.lower() for m in _CONTEXT_MESSAGES):
        return Next.CONTEXT_WINDOW
    return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
