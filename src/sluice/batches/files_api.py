"""The Files API routes: /v1/files (and /files), as OpenAI serves them.

    POST   /v1/files                 multipart/form-data: ``file``, ``purpose`` ("batch")
    GET    /v1/files                 ``purpose``, ``limit`` (1..10000), ``after``, ``order``
    GET    /v1/files/{id}            the file object
    GET    /v1/files/{id}/content    the bytes
    DELETE /v1/files/{id}            ``{"id", "object": "file", "deleted": true}``

The caller is identified before any body is read; a file another key owns is answered 404,
as one that does not exist (`sluice.batches.files.owner_of`). An upload is parsed as it
arrives (python-multipart's streaming parser) and refused with 413 as soon as the file
passes ``files.max_bytes``: at most 1 MiB of it is held in memory, the rest spooled to a
temporary file until it is stored.
"""

from __future__ import annotations

import tempfile
from typing import IO
from urllib.parse import quote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluice.api.caller import caller
from sluice.batches.files import UPLOAD_PURPOSES, FileRecord, FileStore, too_large
from sluice.batches.http import json_response, page_limit
from sluice.batches.owners import owner_of
from sluice.errors import InvalidRequestError, NotFoundError, UnsupportedMediaTypeError
from sluice.pipeline.identify import Identify

JSON = "application/json"
MAX_LIST_LIMIT = 10_000
SPOOL_MEMORY_BYTES = 1024 * 1024
"""Of an upload, what is kept in memory before it is spooled to a temporary file."""
FORM_OVERHEAD_BYTES = 64 * 1024
"""A body may exceed ``max_bytes`` by this much: part headers, boundaries, small fields."""
MAX_FIELD_BYTES = 1024
MAX_PARTS = 16


class FilesRoutes:
    """The /v1/files routes over a `FileStore`; ``identify`` is None in open mode."""

    def __init__(self, store: FileStore, identify: Identify | None) -> None:
        self._store = store
        self._identify = identify

    def routes(self) -> list[Route]:
        routes: list[Route] = []
        for prefix in ("/v1", ""):
            routes += [
                Route(f"{prefix}/files", self.upload, methods=["POST"]),
                Route(f"{prefix}/files", self.list_files, methods=["GET"]),
                Route(f"{prefix}/files/{{file_id}}", self.retrieve, methods=["GET"]),
                Route(f"{prefix}/files/{{file_id}}", self.delete, methods=["DELETE"]),
                Route(f"{prefix}/files/{{file_id}}/content", self.content, methods=["GET"]),
            ]
        return routes

    async def _owner(self, request: Request) -> str | None:
        """The caller's files' owner; raises the 401."""
        return owner_of(await caller(self._identify, request.scope))

    async def _file(self, request: Request) -> FileRecord:
        owner = await self._owner(request)
        file_id: str = request.path_params["file_id"]
        record = await self._store.get(file_id, owner)
        if record is None:
            raise NotFoundError(f"No such File object: {file_id}", param="id")
        return record

    async def upload(self, request: Request) -> Response:
        owner = await self._owner(request)
        boundary = _boundary(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._store.max_bytes + FORM_OVERHEAD_BYTES:
            raise too_large(self._store.max_bytes)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
            form = _UploadForm(boundary, self._store.max_bytes, spool)
            async for chunk in request.stream():
                form.write(chunk)
            purpose, filename = form.finish()
            record = await self._store.create(owner, purpose, filename, spool)
        return json_response(record.to_openai())

    async def list_files(self, request: Request) -> Response:
        owner = await self._owner(request)
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
        records, more = await self._store.list(
            owner,
            purpose=query.get("purpose") or None,
            limit=page_limit(query.get("limit"), default=MAX_LIST_LIMIT, most=MAX_LIST_LIMIT),
            after=query.get("after") or None,
            order="asc" if order == "asc" else "desc",
        )
        return json_response(
            {
                "object": "list",
                "data": [record.to_openai() for record in records],
                "has_more": more,
                "first_id": records[0].id if records else None,
                "last_id": records[-1].id if records else None,
            }
        )

    async def retrieve(self, request: Request) -> Response:
        return json_response((await self._file(request)).to_openai())

    async def content(self, request: Request) -> Response:
        record = await self._file(request)
        chunks = await self._store.stream(record)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(record.bytes),
                "Content-Disposition": f"attachment; filename*=utf-8''{quote(record.filename)}",
                # Never rendered by a browser as a page of this origin, whatever it holds.
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def delete(self, request: Request) -> Response:
        record = await self._file(request)
        if not await self._store.delete(record):
            raise NotFoundError(f"No such File object: {record.id}", param="id")
        return json_response({"id": record.id, "object": "file", "deleted": True})


def _boundary(request: Request) -> bytes:
    media, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaTypeError(
            "Upload a file as multipart/form-data with the fields 'file' and 'purpose'.",
            param="Content-Type",
        )
    return boundary


class _UploadForm:
    """A multipart body parsed as it arrives: the ``file`` part written to ``file``,
    bounded by ``max_bytes``; other fields kept if small, refused if large."""

    def __init__(self, boundary: bytes, max_bytes: int, file: IO[bytes]) -> None:
        self.max_bytes = max_bytes
        self.max_body = max_bytes + FORM_OVERHEAD_BYTES
        self.file = file
        self.filename: str | None = None
        self.fields: dict[str, bytes] = {}
        self._received = 0
        self._file_bytes = 0
        self._parts = 0
        self._ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._field: bytearray | None = None
        self._field_name = ""
        self._in_file = False
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value_data,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
            )
        except FormParserError as exc:
            raise _malformed(exc) from None

    def write(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self.max_body:
            raise too_large(self.max_bytes)
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise _malformed(exc) from None

    def finish(self) -> tuple[str, str]:
        """The upload's purpose and file name, once the whole body has been parsed."""
        if not self._ended:
            raise _malformed("the body ends before the closing boundary")
        purpose = self.fields.get("purpose")
        if purpose is None:
            raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose")
        if self.filename is None:
            raise InvalidRequestError("Missing required parameter: 'file'.", param="file")
        return purpose.decode("utf-8", "replace"), self.filename

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        self._disposition = None
        self._header_name.clear()
        self._header_value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        filename = options.get(b"filename")
        self._in_file = name == "file" and filename is not None
        if self._in_file:
            if self.filename is not None:
                raise InvalidRequestError("Upload one file per request.", param="file")
            assert filename is not None
            # Clients send the name's UTF-8 bytes as they are; the parser kept them.
            self.filename = filename.decode("utf-8", "replace")
            self._field = None
        else:
            self._field_name = name
            self._field = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._file_bytes += end - start
            if self._file_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            # On the event loop: one body chunk at a time, into memory or the page cache.
            self.file.write(data[start:end])
            return
        assert self._field is not None
        self._field += data[start:end]
        if len(self._field) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"The form field {self._field_name!r} is too long.", param=self._field_name
            )

    def _part_end(self) -> None:
        if self._field is None:
            return
        self.fields[self._field_name] = bytes(self._field)
        if self._field_name == "purpose":
            purpose = self.fields["purpose"].decode("utf-8", "replace")
            if purpose not in UPLOAD_PURPOSES:  # refused before the file is read
                raise InvalidRequestError(
                    f"Invalid purpose {purpose!r}: files uploaded here must have "
                    f"purpose {' or '.join(sorted(UPLOAD_PURPOSES))!r}.",
                    param="purpose",
                )
        self._field = None

    def _end(self) -> None:
        self._ended = True


def _malformed(reason: object) -> InvalidRequestError:
    return InvalidRequestError(f"Malformed multipart body: {reason}.", param="file")
