"""Files (OpenAI's Files API): metadata in the ``files`` table, content behind `FileContents`.

A file belongs to the key that made it: ``files.key_id`` is that key's id, or NULL for the
master key and for open mode (no master key configured). A caller sees exactly the files
whose ``key_id`` is its own (`owner_of`): a virtual key its own files only, the master key
the files made with the master key or in open mode, not every key's. A file another owner
holds is answered as missing, so ids cannot be probed.

Content is kept on local disk by default (`DiskContents`: one file per id, written under a
temporary name and renamed, so a reader never sees half a file) or in the
``file_contents`` table (`DatabaseContents`, for replicas that share no disk). Each row
names the storage its content went to, so changing ``files.storage`` leaves older files
readable where their storage still is. Paths are made from the server's own ids (``file-``
and 24 hex digits), never from anything a client sent.

Content is written before its row and deleted after it: a crash in between leaves content
nobody can see, never a row without content.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import io
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from sqlalchemy import and_, delete, insert, or_, select
from sqlalchemy.engine import Row

from sluice.batches.owners import ANYONE, Anyone, owned_by
from sluice.batches.settings import FilesSettings
from sluice.errors import PayloadTooLargeError, SluiceError
from sluice.store.database import Database
from sluice.store.periods import utcnow
from sluice.store.schema import file_contents, files

UPLOAD_PURPOSES = frozenset({"batch"})
"""The purposes a client may upload with."""
PURPOSES = UPLOAD_PURPOSES | {"batch_output"}
"""Every purpose a file may have: ``batch_output`` files are written by batches."""
MAX_FILENAME_CHARS = 255
CHUNK_BYTES = 256 * 1024
_FILE_ID = re.compile(r"file-[0-9a-f]{24}")
# Control (Cc), format (Cf: bidi overrides, zero-width), surrogate and unassigned
# characters: none belongs in a name shown back in listings and terminals.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def is_file_id(text: str) -> bool:
    """Could ``text`` be one of our ids? Anything else is missing without a query."""
    return _FILE_ID.fullmatch(text) is not None


def display_filename(raw: str) -> str:
    """A name fit to show back: what follows the last path separator, without control or
    invisible characters, at most `MAX_FILENAME_CHARS`; ``file`` when nothing is left."""
    name = re.split(r"[/\\]", raw)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in _HIDDEN_CATEGORIES)
    name = name.strip()
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem and len(suffix) < 16:  # keep a short extension: ``….jsonl``
            name = stem[: MAX_FILENAME_CHARS - len(suffix) - 1] + dot + suffix
        else:
            name = name[:MAX_FILENAME_CHARS]
    return name if name not in ("", ".", "..") else "file"


@dataclass(frozen=True)
class FileRecord:
    """One row of ``files``; ``created_at`` is aware UTC."""

    id: str
    key_id: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: datetime
    storage: str  # the `FileContents.name` that holds the content

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def _record(row: Row[Any]) -> FileRecord:
    return FileRecord(
        id=row.id,
        key_id=row.key_id,
        purpose=row.purpose,
        filename=row.filename,
        bytes=int(row.bytes),
        created_at=row.created_at,
        storage=row.storage,
    )


class FileContents(Protocol):
    """Where file contents are kept. Each method takes a server-made file id; ``read``
    and ``open`` raise `FileNotFoundError` for content that is not there."""

    @property
    def name(self) -> str:
        """Stored in ``files.storage``: which storage a file's content is in."""
        ...

    async def write(self, file_id: str, source: IO[bytes]) -> None:
        """Store ``source`` (read from its start) whole, or nothing."""
        ...

    async def read(self, file_id: str) -> bytes: ...

    async def open(self, file_id: str) -> AsyncIterator[bytes]:
        """The content in chunks; raises here, before the first chunk, when missing."""
        ...

    async def delete(self, file_id: str) -> None:
        """Remove the content; nothing when it is already gone."""
        ...


class DiskContents:
    """One file per id under ``directory`` (made on first write, private to this user)."""

    name = "disk"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, file_id: str) -> Path:
        if not is_file_id(file_id):  # the id becomes a path: only our own ids may
            raise ValueError(f"not a file id: {file_id!r}")
        return self.directory / file_id

    async def write(self, file_id: str, source: IO[bytes]) -> None:
        await asyncio.to_thread(self._write, self._path(file_id), source)

    def _write(self, path: Path, source: IO[bytes]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                source.seek(0)
                shutil.copyfileobj(source, out, CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)

    async def read(self, file_id: str) -> bytes:
        return await asyncio.to_thread(self._path(file_id).read_bytes)

    async def open(self, file_id: str) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self._path(file_id).open, "rb")
        return _chunks(handle)

    async def delete(self, file_id: str) -> None:
        await asyncio.to_thread(self._path(file_id).unlink, missing_ok=True)


async def _chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash could otherwise lose the new name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DatabaseContents:
    """Contents in the ``file_contents`` table: one row per file, shared by every replica."""

    name = "database"

    def __init__(self, database: Database) -> None:
        self._db = database

    async def write(self, file_id: str, source: IO[bytes]) -> None:
        source.seek(0)
        data = source.getvalue() if isinstance(source, io.BytesIO) else source.read()
        async with self._db.writer.begin() as conn:
            await conn.execute(insert(file_contents).values(file_id=file_id, content=data))

    async def read(self, file_id: str) -> bytes:
        query = select(file_contents.c.content).where(file_contents.c.file_id == file_id)
        async with self._db.engine.connect() as conn:
            content = (await conn.execute(query)).scalar_one_or_none()
        if content is None:
            raise FileNotFoundError(file_id)
        return bytes(content)

    async def open(self, file_id: str) -> AsyncIterator[bytes]:
        return _slices(await self.read(file_id))

    async def delete(self, file_id: str) -> None:
        async with self._db.writer.begin() as conn:
            await conn.execute(delete(file_contents).where(file_contents.c.file_id == file_id))


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        yield bytes(view[start : start + CHUNK_BYTES])


def content_missing(record: FileRecord) -> SluiceError:
    return SluiceError(
        f"The content of file {record.id} is not available here (stored on "
        f"{record.storage!r}): replicas must share files.directory, or use files.storage "
        "'database'.",
        code="file_content_missing",
    )


class FileStore:
    """Files' metadata in the database and their content in ``contents``.

    ``max_bytes`` bounds what clients upload (purposes in `UPLOAD_PURPOSES`); files the
    gateway writes itself (a batch's output) are not bounded by it.
    """

    def __init__(self, database: Database, contents: FileContents, max_bytes: int) -> None:
        self._db = database
        self.contents = contents
        self.max_bytes = max_bytes
        # Rows name their storage: a file written before files.storage changed stays
        # readable wherever its content can still be reached.
        self._storages: dict[str, FileContents] = {
            DatabaseContents.name: DatabaseContents(database),
            contents.name: contents,
        }

    async def create(
        self, owner: str | None, purpose: str, filename: str, data: bytes | IO[bytes]
    ) -> FileRecord:
        """Store ``data`` as a new file of ``owner``'s (a key id; None for the master
        key or open mode). ``filename`` is cleaned for display (`display_filename`)."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown file purpose {purpose!r}")
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        size = source.seek(0, io.SEEK_END)
        if purpose in UPLOAD_PURPOSES and size > self.max_bytes:
            raise too_large(self.max_bytes)
        record = FileRecord(
            id=new_file_id(),
            key_id=owner,
            purpose=purpose,
            filename=display_filename(filename),
            bytes=size,
            created_at=utcnow(),
            storage=self.contents.name,
        )
        await self.contents.write(record.id, source)
        try:
            async with self._db.writer.begin() as conn:
                await conn.execute(insert(files).values(dataclasses.asdict(record)))
        except BaseException:
            await asyncio.shield(self.contents.delete(record.id))
            raise
        return record

    async def get(self, file_id: str, owner: str | Anyone | None) -> FileRecord | None:
        """The file, or None when there is none or (unless ``owner`` is `ANYONE`) another
        owner holds it: the caller answers 404 either way."""
        if not is_file_id(file_id):
            return None
        query = select(files).where(files.c.id == file_id)
        if owner is not ANYONE:
            query = query.where(_owned_by(owner))
        async with self._db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _record(row) if row is not None else None

    async def list(
        self,
        owner: str | None,
        *,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> tuple[builtins.list[FileRecord], bool]:
        """``owner``'s files, newest first (``order="desc"``, as OpenAI lists them), those
        after the file ``after`` only; and whether there are more. An ``after`` that is
        not one of the owner's files gives an empty page (a cursor whose file was deleted
        must not start the listing over)."""
        query = select(files).where(_owned_by(owner))
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        created, ident = files.c.created_at, files.c.id
        if after is not None:
            anchor = await self.get(after, owner)
            if anchor is None:
                return [], False
            at, aid = anchor.created_at, anchor.id
            if order == "desc":
                query = query.where(or_(created < at, and_(created == at, ident < aid)))
            else:
                query = query.where(or_(created > at, and_(created == at, ident > aid)))
        if order == "desc":
            query = query.order_by(created.desc(), ident.desc())
        else:
            query = query.order_by(created, ident)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def _storage(self, record: FileRecord) -> FileContents:
        storage = self._storages.get(record.storage)
        if storage is None:
            raise content_missing(record)
        return storage

    async def read(self, record: FileRecord) -> bytes:
        """The whole content (a batch's input); see `stream` for sending it."""
        try:
            return await self._storage(record).read(record.id)
        except FileNotFoundError:
            raise content_missing(record) from None

    async def stream(self, record: FileRecord) -> AsyncIterator[bytes]:
        """The content in chunks, opened now: a missing content raises here, before any
        response has started."""
        try:
            return await self._storage(record).open(record.id)
        except FileNotFoundError:
            raise content_missing(record) from None

    async def delete(self, record: FileRecord) -> bool:
        """Delete the file; False when it was already gone."""
        async with self._db.writer.begin() as conn:
            result = await conn.execute(delete(files).where(files.c.id == record.id))
        storage = self._storages.get(record.storage)
        if storage is not None:
            await storage.delete(record.id)
        return bool(result.rowcount)


def _owned_by(owner: str | None) -> Any:
    return owned_by(files.c.key_id, owner)


def too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The file is larger than this server accepts ({max_bytes} bytes; files.max_bytes).",
        param="file",
        code="file_too_large",
    )


def build_file_store(
    settings: FilesSettings, data_dir: str | Path, database: Database
) -> FileStore:
    """The store ``settings`` describe, over ``database`` (which must be started before
    the store is used)."""
    contents: FileContents
    if settings.storage == "database":
        contents = DatabaseContents(database)
    else:
        contents = DiskContents(settings.directory_path(data_dir))
    return FileStore(database, contents, settings.max_bytes)
