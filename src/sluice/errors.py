"""One exception tree for everything a client can be told, each mapped to OpenAI's envelope.

    SluiceError                      500 api_error
    ├── InvalidRequestError          400 invalid_request_error   (malformed JSON, schema)
    │   └── ContextLengthExceededError  400 (prompt + max_tokens over the context)
    ├── AuthenticationError          401 authentication_error
    ├── PermissionDeniedError        403 permission_error
    ├── NotFoundError                404 not_found_error         (unknown route)
    │   └── ModelNotFoundError       404 (unknown model; code model_not_found)
    ├── PayloadTooLargeError         413 invalid_request_error
    ├── UnsupportedMediaTypeError    415 invalid_request_error   (a body that is not JSON)
    ├── ConflictError                409 invalid_request_error   (not possible in this state)
    ├── MisdirectedRequestError      421 invalid_request_error   (a Host not served)
    ├── RateLimitError               429 rate_limit_error        (carries Retry-After)
    ├── ServiceUnavailableError      503 service_unavailable     (draining, overloaded)
    │   └── DeploymentBusyError      503 (a deployment's cap and queue are full; Retry-After)
    │       └── ReservedCapacityError   429 rate_limit_error (only the priority keys' share is left)
    └── UpstreamError                502 upstream_error          (anything from a backend)
        ├── UpstreamConnectError     502 (unreachable, reset before a response)
        ├── UpstreamTimeoutError     504 (connect, first byte or total timeout)
        ├── UpstreamAuthError        502 (the upstream refused the operator's credentials)
        └── UpstreamStatusError      the upstream's own status and body, relayed as is

A handler walks nothing: every class knows its status, type and code, and `envelope()`
renders the body. Backends translate their library's exceptions into this tree at their
boundary, so callers above them see only these classes.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import orjson

MAX_RETRY_AFTER = 3600.0
"""Seconds: the longest wait an upstream's Retry-After is taken at (a larger one is cut)."""


class SluiceError(Exception):
    """Base of every error Sluice reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def kind(self) -> str:
        """Short label for metrics and logs (``upstream_timeout``, ``invalid_request``…)."""
        return _snake(type(self).__name__.removesuffix("Error"))

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequestError(SluiceError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(SluiceError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(SluiceError):
    status = 403
    type = "permission_error"
    default_code = "model_not_allowed"


class NotFoundError(SluiceError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(SluiceError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaTypeError(SluiceError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class ConflictError(SluiceError):
    """The request is well formed but the server's state does not allow it (an admin
    reload without a configuration file)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class MisdirectedRequestError(SluiceError):
    status = 421
    type = "invalid_request_error"
    default_code = "host_not_allowed"


class RateLimitError(SluiceError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(SluiceError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class DeploymentBusyError(ServiceUnavailableError):
    """A deployment's concurrency cap and its queue are full (or the wait ran out): the
    attempts step moves on to the next candidate without an upstream call."""

    default_code = "deployment_busy"


class ReservedCapacityError(DeploymentBusyError):
    """What is left of a deployment's slots and queue is kept for keys with priority > 0:
    429 to this caller (its class's share is in use), though still "busy" to the attempts
    step, which tries the next candidate as for any busy deployment."""

    status = 429
    type = "rate_limit_error"
    default_code = "priority_capacity_reserved"


class UpstreamError(SluiceError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamConnectError(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"
    default_code = "upstream_timeout"


class UpstreamAuthError(UpstreamError):
    """The upstream answered 401 or 403: the gateway's own credentials were refused. Its
    body is not relayed (it can describe the operator's key)."""

    default_code = "upstream_auth_failed"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status; its body is relayed unchanged, and a 429's
    or 503's Retry-After (``retry_after``, seconds) with it. ``should_retry`` is the
    upstream's ``x-should-retry`` (OpenAI's), None when it sent none."""

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        headers = None
        if retry_after is not None and status in (429, 503):
            headers = {"Retry-After": str(math.ceil(retry_after))}
        super().__init__(f"upstream returned HTTP {status}", headers=headers)
        self.upstream_status = status
        self.upstream_body = body
        self.content_type = content_type
        self.retry_after = retry_after
        self.should_retry = should_retry

    @property
    def http_status(self) -> int:
        return self.upstream_status

    @property
    def kind(self) -> str:
        return f"upstream_http_{self.upstream_status // 100}xx"

    def body(self) -> bytes:
        # Relay faithfully when the upstream already speaks OpenAI's envelope.
        if self.content_type.startswith("application/json"):
            try:
                parsed = orjson.loads(self.upstream_body)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                return self.upstream_body
        text = self.upstream_body[:2000].decode("utf-8", "replace")
        return orjson.dumps(
            {
                "error": {
                    "message": f"upstream returned HTTP {self.upstream_status}: {text}",
                    "type": "upstream_error",
                    "param": None,
                    "code": f"upstream_http_{self.upstream_status}",
                }
            }
        )


def retry_after_seconds(
    value: str | bytes | None, now: datetime | None = None, *, millis: bool = False
) -> float | None:
    """The wait a Retry-After value asks for, in seconds: delta-seconds or an HTTP-date
    (``millis``: a number of milliseconds, as ``retry-after-ms`` carries).

    None when absent or unreadable; a negative or non-finite number is unreadable, a date in
    the past is 0, and anything longer than `MAX_RETRY_AFTER` is cut to it. Whatever an
    upstream writes, the answer is a small finite number or None.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value or len(value) > 64:
        return None
    if value[0].isdigit():
        try:
            seconds = float(value) / (1000 if millis else 1)
        except ValueError:
            return None
        return min(seconds, MAX_RETRY_AFTER) if math.isfinite(seconds) else None
    if millis:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _snake(name: str) -> str:
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out) or "error"
