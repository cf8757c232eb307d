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

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.batches.files import FileStore, owner_of
from sluice.batches.metrics import BatchMetrics
from sluice.batches.settings import BatchSettings
from sluice.batches.store import BatchRecord, BatchStore
from sluice.batches.validate import ENDPOINTS, check_input
from sluice.errors import ConflictError, InvalidRequestError, NotFoundError
from sluice.pipeline.auth import Principal
from sluice.pipeline.context import SCOPE_KEY, RequestContext
from sluice.pipeline.identify import Identify
from sluice.protocol import parse_json_object
from sluice.routing.router import Router

WINDOWS = {"24h": timedelta(hours=24)}
_MAX_METADATA = 16
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
        on_created: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._files = files
        self._router = router
        self._settings = settings
        self._metrics = metrics
        self._identify = identify
        self._on_created = on_created

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
        principal = await self._caller(request)
        body = parse_json_object(await request.body())
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint"
            )
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise InvalidRequestError(
                "'completion_window' must be \"24h\".", param="completion_window"
            )
        metadata = _metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        owner = owner_of(principal)
        record = await self._files.get(file_id, owner) if isinstance(file_id, str) else None
        if record is None:
            raise NotFoundError(f"No such file: {str(file_id)[:100]!r}.", param="input_file_id")
        if record.purpose != "batch":
            raise InvalidRequestError(
                "The input file must have been uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        key = principal.key if principal is not None else None
        # Up to 50,000 lines are parsed and validated: in a thread, so that the event loop
        # keeps serving requests in between (the GIL is handed back every few ms).
        lines, errors = await asyncio.to_thread(
            check_input,
            await self._files.read(record),
            endpoint,
            serves=self._router.knows,
            may_use=lambda model: key is None or key.models is None or model in key.models,
            max_lines=self._settings.max_lines,
            max_line_bytes=self._settings.max_line_bytes,
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
        return _json(batch.to_openai())

    async def list(self, request: Request) -> Response:
        principal = await self._caller(request)
        limit = _limit(request.query_params.get("limit"))
        found, more = await self._store.list(
            owner_of(principal), limit=limit, after=request.query_params.get("after")
        )
        data = [b.to_openai() for b in found]
        return _json(
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
        return _json(batch.to_openai())

    async def cancel(self, request: Request) -> Response:
        batch = await self._owned(request)
        if not await self._store.cancel(batch.id):
            raise ConflictError(
                f"The batch is {batch.status}: only a batch in progress can be cancelled.",
                code="batch_not_cancellable",
            )
        cancelled = await self._store.get(batch.id)
        assert cancelled is not None
        return _json(cancelled.to_openai())

    async def _owned(self, request: Request) -> BatchRecord:
        principal = await self._caller(request)
        batch_id = request.path_params["batch_id"]
        batch = await self._store.get(batch_id, owner_of(principal))
        if batch is None:
            raise NotFoundError(f"No such batch: {batch_id[:100]!r}.", code="batch_not_found")
        return batch

    async def _caller(self, request: Request) -> Principal | None:
        """The caller (401 without a valid key); None when the gateway runs without keys."""
        if self._identify is None:
            return None
        ctx: RequestContext = request.scope[SCOPE_KEY]
        ctx.headers = request.scope["headers"]
        ctx.query_string = request.scope["query_string"]
        ctx.client = request.scope.get("client")
        await self._identify.identify(ctx)
        return ctx.principal


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


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    if not value.isdigit() or not 1 <= int(value) <= _MAX_LIST:
        raise InvalidRequestError(f"'limit' must be from 1 to {_MAX_LIST}.", param="limit")
    return int(value)


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type=_JSON)
