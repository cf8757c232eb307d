"""OpenAI's Batch API: ``/v1/batches`` (create, list, retrieve, cancel).

A batch is created from a file uploaded with ``purpose=batch`` (`sluice.batches.files`),
validated whole at once (`sluice.batches.validate`): a bad file gives a batch that is
``failed`` from the start, its ``errors`` naming the lines. Batches, like files, belong to
the key that made them: another key gets 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.api.caller import caller
from sluice.batches.files import FileStore
from sluice.batches.http import json_response, page_limit
from sluice.batches.metrics import BatchMetrics
from sluice.batches.owners import ANYONE, owner_of
from sluice.batches.settings import BatchSettings
from sluice.batches.store import BatchRecord, BatchStore
from sluice.batches.validate import ENDPOINTS, check_input
from sluice.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
)
from sluice.pipeline.identify import Identify
from sluice.pipeline.request import read_body
from sluice.protocol import parse_json_object
from sluice.routing.router import Router

WINDOWS = {"24h": timedelta(hours=24)}
_MAX_METADATA = 16
MAX_CREATE_BYTES = 64 * 1024
"""Room for the largest metadata OpenAI allows (16 x (64 + 512) characters) and more."""
_MAX_LIST = 100
_JSON = "application/json"


class BatchRoutes:
    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        router: Router,
        settings: BatchSettings,
        metrics: BatchMetrics,
        identify: Identify | None,
        max_body_bytes: int,
        on_created: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._files = files
        self._router = router
        self._settings = settings
        self._metrics = metrics
        self._identify = identify
        self._on_created = on_created
        self._one_at_a_time = asyncio.Lock()
        # A line runs as an interactive request would: no larger than the body limit.
        self._max_line_bytes = min(settings.max_line_bytes, max_body_bytes)

    def routes(self) -> list[Route]:
        routes = []
        for prefix in ("/v1", ""):
            routes += [
                Route(f"{prefix}/batches", self.create, methods=["POST"]),
                Route(f"{prefix}/batches", self.list, methods=["GET"]),
                Route(f"{prefix}/batches/{{batch_id}}", self.retrieve, methods=["GET"]),
                Route(f"{prefix}/batches/{{batch_id}}/cancel", self.cancel, methods=["POST"]),
            ]
        return routes

    async def create(self, request: Request) -> Response:
        principal = await caller(self._identify, request.scope)
        # A batch's creation is a few fields: its body is read up to MAX_CREATE_BYTES.
        body = parse_json_object(
            await read_body(request.receive, request.scope["headers"], MAX_CREATE_BYTES)
        )
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint"
            )
        window = body.get("completion_window")
        if not isinstance(window, str) or window not in WINDOWS:
            raise InvalidRequestError(
                "'completion_window' must be \"24h\".", param="completion_window"
            )
        metadata = _metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        owner = owner_of(principal)
        if await self._store.open_batches(owner) >= self._settings.max_open_per_key:
            raise RateLimitError(
                f"This key has {self._settings.max_open_per_key} batches that have not "
                "finished: wait for one, or cancel one.",
                code="too_many_open_batches",
            )
        record = await self._files.get(file_id, owner) if isinstance(file_id, str) else None
        if record is None:
            raise NotFoundError(f"No such file: {str(file_id)[:100]!r}.", param="input_file_id")
        if record.purpose != "batch":
            raise InvalidRequestError(
                "The input file must have been uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        key = principal.key if principal is not None else None
        # One input at a time in a process (each may hold a few times its file in memory),
        # parsed and validated in a thread, so that the event loop keeps serving requests
        # in between (the GIL is handed back every few ms).
        async with self._one_at_a_time:
            lines, errors = await asyncio.to_thread(
                check_input,
                await self._files.read(record),
                endpoint,
                serves=self._router.knows,
                may_use=lambda model: key is None or key.models is None or model in key.models,
                max_lines=self._settings.max_lines,
                max_line_bytes=self._max_line_bytes,
            )
            batch = await self._store.create(
                key_id=owner,
                endpoint=endpoint,
                input_file_id=record.id,
                completion_window=WINDOWS[window],
                window_name=window,
                metadata=metadata,
                lines=lines,
                errors=errors,
            )
        self._metrics.batches.labels("failed" if errors else "created").inc()
        if not errors:
            self._on_created()
        return json_response(batch.to_openai())

    async def list(self, request: Request) -> Response:
        principal = await caller(self._identify, request.scope)
        limit = page_limit(request.query_params.get("limit"), default=20, most=_MAX_LIST)
        found, more = await self._store.list(
            owner_of(principal), limit=limit, after=request.query_params.get("after")
        )
        data = [b.to_openai() for b in found]
        return json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            }
        )

    async def retrieve(self, request: Request) -> Response:
        batch = await self._owned(request)
        return json_response(batch.to_openai())

    async def cancel(self, request: Request) -> Response:
        batch = await self._owned(request)
        if not await self._store.cancel(batch.id):
            raise ConflictError(
                f"The batch is {batch.status}: only a batch in progress can be cancelled.",
                code="batch_not_cancellable",
            )
        cancelled = await self._store.get(batch.id, ANYONE)
        assert cancelled is not None
        return json_response(cancelled.to_openai())

    async def _owned(self, request: Request) -> BatchRecord:
        principal = await caller(self._identify, request.scope)
        batch_id = request.path_params["batch_id"]
        batch = await self._store.get(batch_id, owner_of(principal))
        if batch is None:
            raise NotFoundError(f"No such batch: {batch_id[:100]!r}.", code="batch_not_found")
        return batch


def _metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's bounds: at most 16 pairs, keys of 64 characters, values of 512."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > _MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise InvalidRequestError(
            "'metadata' must map at most 16 keys (64 characters) to strings (512).",
            param="metadata",
        )
    return value
