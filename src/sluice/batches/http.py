"""Small pieces the Files and Batch routes share: JSON responses and list limits."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from sluice.errors import InvalidRequestError


def json_response(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def page_limit(value: str | None, *, default: int, most: int) -> int:
    """A list route's ``limit`` query parameter (400 outside 1..most)."""
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise InvalidRequestError(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(value)
