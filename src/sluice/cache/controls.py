"""A request's own say over the cache: ``Cache-Control`` or the body's ``cache`` field.

    Cache-Control: no-cache      answer from upstream (the answer is still stored)
    Cache-Control: no-store      do not store this answer
    Cache-Control: max-age=N     accept a stored answer at most N seconds old, and keep
                                 this one N seconds (at most ``cache.max_ttl``); a request
                                 that is not deterministic is stored only when it says so
    {"cache": {"no-cache": true, "no-store": true, "max-age": 60}}   the same, in the body

The body field is removed before the request goes upstream. A key may be denied these
controls (``cache_controls: false``): its requests are then served as if they sent none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.errors import InvalidRequestError

_MAX_AGE_LIMIT = 10**9


@dataclass(slots=True, frozen=True)
class Controls:
    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None


NONE = Controls()


def read_controls(header: bytes | None, field: Any) -> Controls:
    """The controls of a request: the header's directives, then the body's (which win).
    Unknown header directives are ignored (as HTTP caches do); a malformed body field is a
    400, since the client wrote it for this gateway."""
    no_cache = no_store = False
    max_age: int | None = None
    if header:
        for directive in header.decode("latin-1").lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age" and value.strip().isdigit():
                max_age = min(int(value.strip()), _MAX_AGE_LIMIT)
    if field is not None:
        if not isinstance(field, dict):
            raise _bad("'cache' must be an object such as {\"no-cache\": true}.")
        for name, value in field.items():
            if name in ("no-cache", "no-store"):
                if not isinstance(value, bool):
                    raise _bad(f"'cache.{name}' must be true or false.")
                if name == "no-cache":
                    no_cache = value
                else:
                    no_store = value
            elif name == "max-age":
                if type(value) is not int or not 0 <= value <= _MAX_AGE_LIMIT:
                    raise _bad("'cache.max-age' must be a whole number of seconds.")
                max_age = value
            else:
                raise _bad(
                    f"Unknown field 'cache.{str(name)[:40]}': use no-cache, no-store, max-age."
                )
    if not (no_cache or no_store or max_age is not None):
        return NONE
    return Controls(no_cache, no_store, max_age)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="cache")
