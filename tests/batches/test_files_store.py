"""FileStore on SQLite and PostgreSQL, with contents on disk and in the database."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sluice.batches.files import (
    DatabaseContents,
    DiskContents,
    FileStore,
    build_file_store,
    display_filename,
    is_file_id,
)
from sluice.batches.owners import ANYONE, owner_of
from sluice.batches.settings import FilesSettings
from sluice.errors import PayloadTooLargeError, SluiceError
from sluice.keys.store import KeyRecord
from sluice.pipeline.auth import MASTER, Principal
from sluice.store.database import Database
from sluice.store.schema import file_contents, files

LINES = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


@pytest.fixture(params=["disk", "database"])
def store(request: pytest.FixtureRequest, db: Database, tmp_path: Path) -> FileStore:
    settings = FilesSettings(storage=request.param, max_bytes=1000)
    return build_file_store(settings, tmp_path, db)


async def count(db: Database, table: object) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def test_a_file_round_trips(store: FileStore) -> None:
    record = await store.create("key_a", "batch", "input.jsonl", LINES)

    assert is_file_id(record.id)
    assert record.bytes == len(LINES)
    assert record.created_at.tzinfo is not None
    assert record.storage == store.contents.name
    assert await store.get(record.id, "key_a") == record
    assert await store.read(record) == LINES
    assert b"".join([chunk async for chunk in await store.stream(record)]) == LINES
    assert record.to_openai() == {
        "id": record.id,
        "object": "file",
        "bytes": len(LINES),
        "created_at": int(record.created_at.timestamp()),
        "filename": "input.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def test_large_contents_stream_in_chunks(store: FileStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: several chunks
    record = await store.create(None, "batch_output", "out.jsonl", data)
    chunks = [chunk async for chunk in await store.stream(record)]
    assert len(chunks) > 1
    assert b"".join(chunks) == data
    assert await store.read(record) == data


async def test_a_spooled_upload_is_stored_from_its_start(store: FileStore) -> None:
    with tempfile.SpooledTemporaryFile(max_size=10) as spool:
        spool.write(LINES)  # past max_size: on disk, positioned at its end
        record = await store.create(None, "batch", "input.jsonl", spool)
    assert record.bytes == len(LINES)
    assert await store.read(record) == LINES


async def test_each_owner_sees_only_its_own_files(store: FileStore) -> None:
    mine = await store.create("key_a", "batch", "a.jsonl", LINES)
    theirs = await store.create("key_b", "batch", "b.jsonl", LINES)
    masters = await store.create(None, "batch", "m.jsonl", LINES)

    assert await store.get(mine.id, "key_b") is None
    assert await store.get(mine.id, None) is None  # the master key is not every key
    assert await store.get(masters.id, "key_a") is None
    assert await store.get(masters.id, None) == masters
    assert await store.get(theirs.id, ANYONE) == theirs
    assert [f.id for f in (await store.list("key_a"))[0]] == [mine.id]
    assert [f.id for f in (await store.list(None))[0]] == [masters.id]
    # Someone else's file is no cursor either.
    assert await store.list("key_a", after=theirs.id) == ([], False)


def test_owner_of_a_principal() -> None:
    key = KeyRecord(id="key_a", key_hash="h", display="sk…a")
    assert owner_of(Principal(key)) == "key_a"
    assert owner_of(MASTER) is None
    assert owner_of(None) is None  # open mode


async def test_ids_that_are_not_ours_are_missing(store: FileStore) -> None:
    for file_id in ("file-abc", "../../etc/passwd", "file-" + "0" * 23 + "\x00", ""):
        assert await store.get(file_id, None) is None
        assert await store.get(file_id, ANYONE) is None


async def test_listing_pages_newest_first(store: FileStore) -> None:
    made = [await store.create("key_a", "batch", f"{i}.jsonl", LINES) for i in range(5)]
    out = await store.create("key_a", "batch_output", "out.jsonl", LINES)
    newest_first = [out.id, *(f.id for f in reversed(made))]

    page, more = await store.list("key_a", limit=2)
    assert [f.id for f in page] == newest_first[:2]
    assert more
    page, more = await store.list("key_a", limit=2, after=page[-1].id)
    assert [f.id for f in page] == newest_first[2:4]
    assert more
    page, more = await store.list("key_a", limit=10, after=page[-1].id)
    assert [f.id for f in page] == newest_first[4:]
    assert not more

    page, _ = await store.list("key_a", order="asc")
    assert [f.id for f in page] == newest_first[::-1]
    page, _ = await store.list("key_a", order="asc", after=made[2].id)
    assert [f.id for f in page] == [made[3].id, made[4].id, out.id]

    page, _ = await store.list("key_a", purpose="batch_output")
    assert [f.id for f in page] == [out.id]
    assert await store.list("key_a", after="file-" + "f" * 24) == ([], False)


async def test_files_made_in_the_same_instant_keep_one_order(db: Database, tmp_path: Path) -> None:
    store = FileStore(db, DiskContents(tmp_path), 1000)
    made = await asyncio.gather(*(store.create(None, "batch", "x", b"x") for _ in range(20)))
    seen: list[str] = []
    page, more = await store.list(None, limit=3)
    while True:
        seen += [f.id for f in page]
        if not more:
            break
        page, more = await store.list(None, limit=3, after=page[-1].id)
    assert sorted(seen) == sorted(f.id for f in made)
    assert len(seen) == len(set(seen))


async def test_delete_removes_the_row_and_the_content(
    store: FileStore, db: Database, tmp_path: Path
) -> None:
    record = await store.create("key_a", "batch", "a.jsonl", LINES)
    assert await store.delete(record)
    assert await store.get(record.id, "key_a") is None
    assert await count(db, files) == 0
    assert await count(db, file_contents) == 0
    assert not any((tmp_path / "files").glob("*"))
    assert not await store.delete(record)  # already gone


async def test_uploads_are_bounded_but_batch_outputs_are_not(store: FileStore) -> None:
    with pytest.raises(PayloadTooLargeError):
        await store.create("key_a", "batch", "big.jsonl", b"x" * 1001)
    assert await store.list("key_a") == ([], False)
    record = await store.create("key_a", "batch_output", "out.jsonl", b"x" * 5000)
    assert record.bytes == 5000
    with pytest.raises(ValueError, match="purpose"):
        await store.create("key_a", "fine-tune", "x", b"x")


async def test_lost_content_is_an_error_that_says_why(db: Database, tmp_path: Path) -> None:
    store = FileStore(db, DiskContents(tmp_path / "files"), 1000)
    record = await store.create(None, "batch", "a.jsonl", LINES)
    (tmp_path / "files" / record.id).unlink()  # another replica's disk, say
    with pytest.raises(SluiceError) as caught:
        await store.read(record)
    assert caught.value.code == "file_content_missing"
    with pytest.raises(SluiceError):
        await store.stream(record)
    # Switched to database storage: the disk file is named by its row, and unreachable.
    switched = FileStore(db, DatabaseContents(db), 1000)
    with pytest.raises(SluiceError, match=r"files\.directory"):
        await switched.read(record)


async def test_contents_stay_readable_after_the_storage_changes(
    db: Database, tmp_path: Path
) -> None:
    before = FileStore(db, DatabaseContents(db), 1000)
    record = await before.create(None, "batch", "a.jsonl", LINES)
    after = FileStore(db, DiskContents(tmp_path), 1000)
    assert await after.read(record) == LINES
    assert await after.delete(record)
    assert await count(db, file_contents) == 0


async def test_a_failed_row_leaves_no_content(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(db, DiskContents(tmp_path / "files"), 1000)

    def down() -> None:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(Database, "writer", property(lambda self: down()))
    with pytest.raises(ConnectionError):
        await store.create(None, "batch", "a.jsonl", LINES)
    assert not any((tmp_path / "files").iterdir())


def test_disk_contents_write_whole_files_privately(tmp_path: Path) -> None:
    contents = DiskContents(tmp_path / "files")
    file_id = "file-" + "a" * 24

    async def write() -> None:
        with tempfile.TemporaryFile() as source:
            source.write(LINES)
            await contents.write(file_id, source)

    asyncio.run(write())
    path = tmp_path / "files" / file_id
    assert path.read_bytes() == LINES
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "files").stat().st_mode & 0o777 == 0o700
    assert [p.name for p in (tmp_path / "files").iterdir()] == [file_id]  # no temp left
    with pytest.raises(ValueError, match="not a file id"):
        asyncio.run(contents.read("../secret"))


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("input.jsonl", "input.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\batch.jsonl", "batch.jsonl"),
        ("a\x00b\r\n\x1b[31mc.jsonl", "ab[31mc.jsonl"),
        ("evil\u202egnp.jsonl", "evilgnp.jsonl"),
        ("  ", "file"),
        ("..", "file"),
        ("dir/", "file"),
        ("données.jsonl", "données.jsonl"),
        ("x" * 300 + ".jsonl", "x" * 249 + ".jsonl"),
        ("y" * 300, "y" * 255),
    ],
)
def test_display_filename(raw: str, shown: str) -> None:
    assert display_filename(raw) == shown


def test_settings_default_directory(tmp_path: Path) -> None:
    assert FilesSettings().directory_path(tmp_path) == tmp_path / "files"
    assert FilesSettings(directory=str(tmp_path / "x")).directory_path("/nowhere") == (
        tmp_path / "x"
    )
    assert FilesSettings().max_bytes == 100 * 1024 * 1024
    assert FilesSettings().storage == "disk"
