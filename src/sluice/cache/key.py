"""The cache key: a hash of everything in a request that can change its answer.

Two requests share a key exactly when an upstream would answer them alike: the same
namespace (whose answers may be shared, `namespace`), route and served model (after alias
resolution), and the same body once canonicalised: keys sorted, JSON whitespace and number
spelling gone (``1``, ``1.0`` and ``1e0`` are one number; ``-0.0`` is ``0``), and the fields
that change only the delivery, not the answer, left out (`DELIVERY_FIELDS`). Every other
field counts, unknown pass-through fields included: a field the gateway does not know may
well change the output, so leaving it out could serve a wrong answer, while keeping it only
costs a miss.

The semantic cache's scope (`scope_of`) is the same hash over the body with the last user
turn's text left out: requests that differ only in how the question is worded share a scope,
and are compared by meaning within it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

DELIVERY_FIELDS = frozenset(
    {
        "stream",  # a stored stream answers a complete request and the other way round
        "stream_options",  # whether usage is sent: the replay adds or drops it
        "user",  # the caller's end-user id, for abuse monitoring
        "metadata",  # tags stored with the request, not read by the model
        "store",  # whether the provider keeps the completion
        "cache",  # the gateway's own per-request cache control (`sluice.cache.controls`)
    }
)
_SEPARATOR = b"\x00"
_INT_MIN, _INT_MAX = -(2**63), 2**63


def canonical(value: Any) -> Any:
    """``value`` with every float that holds an integer turned into that integer, so that
    the number's spelling does not matter (orjson writes other floats in their shortest
    round-trip form, one spelling per value)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        # Only where the integer fits the 64 bits orjson writes; past that a float keeps
        # its own (shortest, unique) spelling.
        return int(value) if value.is_integer() and _INT_MIN <= value < _INT_MAX else value
    if kind is list:
        return [canonical(item) for item in value]
    if kind is dict:
        return {name: canonical(item) for name, item in value.items()}
    return value


def request_key(namespace: str, route: str, model: str, body: dict[str, Any]) -> str:
    """The exact cache key of a request (hex): 128 bits of BLAKE2b."""
    kept = {name: value for name, value in body.items() if name not in DELIVERY_FIELDS}
    kept.pop("model", None)  # the served model is hashed on its own, after alias resolution
    return _digest(namespace, route, model, kept)


def scope_of(
    namespace: str, route: str, model: str, body: dict[str, Any]
) -> tuple[str, str] | None:
    """The semantic scope of a chat request and the text compared within it (the last
    message, when it is the user's and plain text); None when there is no such turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = last.get("content")
    if not isinstance(text, str) or not text.strip():
        return None
    kept = {name: value for name, value in body.items() if name not in DELIVERY_FIELDS}
    kept.pop("model", None)
    kept["messages"] = [*messages[:-1], {**last, "content": None}]
    return _digest(namespace, route, model, kept), text


def _digest(namespace: str, route: str, model: str, kept: dict[str, Any]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in (namespace, route, model):
        hasher.update(part.encode())
        hasher.update(_SEPARATOR)
    hasher.update(orjson.dumps(canonical(kept), option=orjson.OPT_SORT_KEYS))
    return hasher.hexdigest()


def tag(text: str) -> str:
    """A short, glob-safe stand-in for a namespace or model name in a stored key, so that
    entries can be found (and flushed) by either without the name itself in the key."""
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
