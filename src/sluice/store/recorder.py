"""Writing usage records off the request path: buffer, batch, retry, drain, spool.

``record()`` only appends to an in-memory buffer. One background task writes batches
with ``insert_many``; a failed write is retried with exponential backoff and the batch is
kept. While the database is down the buffer is bounded: past ``max_buffered`` records the
oldest are moved to the spool file (JSON lines), and the first successful write after that
replays the file. ``close()`` drains the buffer; whatever the database still refuses when
its timeout runs out is appended to the spool file, and the next ``start()`` replays it
(``insert_many`` is idempotent, so records already written are not counted twice).

A batch the database refuses for good (`sluice.store.refusals`: a value out of range, a
constraint; not an outage, which is retried) is bisected until the records it refuses are
found; those go to the dead-letter file and the rest are written. The background task is
supervised: should it die of an unexpected error, the records it held go back to the
front of the buffer and it is restarted after a backoff (logged, and counted through
``on_restart``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

from sluice.store.refusals import DeadLetters, refused_for_good
from sluice.store.usage import UsageRecord

log = logging.getLogger(__name__)
_BACKLOG_FACTOR = 10  # at most this many batch_size batches written as one
_HEALTHY_RUN = 60.0  # seconds: a writer that ran this long before dying restarts at once


class UsageSink(Protocol):
    """What the recorder writes to; ``UsageStore`` is one."""

    async def insert_many(self, records: Sequence[UsageRecord]) -> int: ...


class UsageRecorder:
    def __init__(
        self,
        store: UsageSink,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        spool_path: Path | None = None,
        on_error: Callable[[Exception], None] | None = None,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        max_buffered: int = 100_000,
        dead_letter_path: Path | None = None,
        on_dead_letter: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        adopt: Callable[[], list[Path]] | None = None,
        on_progress: Callable[[int, float | None], None] | None = None,
    ) -> None:
        """``on_progress(pending, last_write)`` is told, at every turn of the writer (at
        least every ``flush_interval``), how many records wait and when a write last
        succeeded (``time.time()``; None before the first): the backlog and stall metrics."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_buffered < batch_size:
            raise ValueError("max_buffered must be at least batch_size")
        self._store = store
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._spool_path = spool_path
        self._on_error = on_error
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._max_buffered = max_buffered
        self._dead_letters = DeadLetters(dead_letter_path)
        self._on_dead_letter = on_dead_letter
        self._on_restart = on_restart
        self._adopt = adopt  # spool files of processes gone (`sluice.store.spools`), at start
        self._on_progress = on_progress
        self._last_write: float | None = None
        self._bisecting = False  # looking for the records of a refused batch
        self._spilled = False  # records were moved to the spool while the writer ran
        self._reader: _SpoolReader | None = None  # the replay file being written
        self._buffer: deque[UsageRecord] = deque()
        self._batch: list[UsageRecord] = []  # taken from the buffer, not yet written
        self._replay: list[UsageRecord] = []  # from the spool file, not yet written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.written = 0  # records the database acknowledged (duplicates included)
        self.failures = 0  # failed write attempts
        self.dead_lettered = 0  # records the database refused for good, set aside
        self.restarts = 0  # times the background writer died and was restarted

    @property
    def pending(self) -> int:
        """Records buffered or in flight, not yet written."""
        return len(self._buffer) + len(self._batch) + len(self._replay)

    def record(self, rec: UsageRecord) -> None:
        """Queue one record; never blocks (call it from the event loop's thread)."""
        if self._closed:
            self._late(rec)
            return
        self._buffer.append(rec)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
            if len(self._buffer) > self._max_buffered and self._spool_path is not None:
                self._spill()

    async def start(self) -> None:
        """Replay the spool file, if any (with those ``adopt`` claims), then start the
        background writer."""
        if self._task is not None or self._closed:
            raise RuntimeError("UsageRecorder.start() called twice or after close()")
        if self._adopt is not None and self._spool_path is not None:
            try:
                await asyncio.to_thread(self._take_adopted, self._adopt, self._spool_path)
            except OSError:  # what was adopted stays on disk, under this process's pid
                log.exception("could not adopt the usage spools of stopped processes")
        if await asyncio.to_thread(self._take_spool):
            try:
                await self._replay_file(retry=False)
            except Exception as exc:  # the writer goes on with it first, retrying
                self._failed(exc, len(self._replay), "replaying the usage spool")
        self._task = asyncio.create_task(self._supervise(), name="sluice-usage-recorder")

    async def close(self, timeout: float = 10) -> None:  # noqa: ASYNC109 (a drain deadline)
        """Write everything buffered; after ``timeout`` seconds, spool what is left."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._task is None:  # never started: drain here, under the same deadline
            self._task = asyncio.create_task(self._supervise(), name="sluice-usage-recorder")
        task = self._task
        try:
            await asyncio.wait({task}, timeout=timeout)
        finally:
            self._closed = True
            if not task.done():
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("usage recorder task failed")
            # Spool synchronously: this also runs when close() itself is cancelled.
            # A replay cut short leaves its file (self._replay included), which the next
            # start() merges back into the spool.
            if self._reader is not None:
                self._reader.close()
            left = [*self._batch, *self._buffer]
            self._batch, self._replay = [], []
            self._buffer.clear()
            if left:
                self._spool(left)

    async def _supervise(self) -> None:
        """Run the writer; should it die of an unexpected error, restart it with backoff."""
        loop = asyncio.get_running_loop()
        delay = self._retry_initial
        while True:
            started = loop.time()
            try:
                await self._run()
                return
            except Exception:
                if loop.time() - started > _HEALTHY_RUN:
                    delay = self._retry_initial
                self.restarts += 1
                log.exception("usage writer failed; restarting it in %.2fs", delay)
                self._recover()
                if self._on_restart is not None:
                    try:
                        self._on_restart()
                    except Exception:
                        log.exception("usage recorder on_restart callback failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

    def _recover(self) -> None:
        """After the writer died: the batch it held goes back to the front of the buffer; a
        replay in progress is dropped (its file stays, and is replayed after the next
        successful write: `_take_spool` merges it back into the spool)."""
        if self._batch:
            self._buffer.extendleft(reversed(self._batch))
            self._batch = []
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self._replay = []
            self._spilled = True

    async def _run(self) -> None:
        if self._reader is not None:
            await self._replay_file(retry=True)
        while True:
            if len(self._buffer) < self._batch_size and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            if self._on_progress is not None:
                self._on_progress(self.pending, self._last_write)
            if not self._buffer:
                if self._closing:
                    return
                continue
            # A backlog is written in bigger batches: a batch's fixed cost (a transaction, the
            # hops to the driver's thread) then stops bounding throughput under heavy load.
            count = min(len(self._buffer), self._batch_size * _BACKLOG_FACTOR)
            self._batch = [self._buffer.popleft() for _ in range(count)]
            await self._write(self._batch)
            self._batch = []
            if self._spilled:  # the database is back: write what went to the spool
                await self._replay_spilled()

    def _spill(self) -> None:
        """Move the oldest records to the spool file: the database has been failing for
        long enough to buffer ``max_buffered`` records, and memory must stay bounded."""
        count = len(self._buffer) - self._max_buffered // 2
        spilled = [self._buffer.popleft() for _ in range(count)]
        try:
            self._spool(spilled, replay="once the database answers")
        except OSError:
            self._buffer.extendleft(reversed(spilled))  # kept in memory, and said so
            log.exception("could not spill %d usage records to the spool", count)
            return
        self._spilled = True

    async def _replay_spilled(self) -> None:
        """Write the records spilled during an outage."""
        self._spilled = False
        try:
            taken = await asyncio.to_thread(self._take_spool)
        except OSError:
            self._spilled = True  # tried again after the next batch
            log.exception("could not open the usage spool %s for replay", self._spool_path)
            return
        if taken:
            await self._replay_file(retry=True)

    def _take_spool(self) -> bool:
        """Set up the replay of the spool: it is renamed to the replay file first, so that
        records spilled meanwhile start a new spool. True when there is a file to replay."""
        if self._spool_path is None:
            return False
        replay = self._replay_path()
        if replay.exists():  # a replay cut short by a restart: back into the spool
            _move_into(replay, self._spool_path)
        if not self._spool_path.exists():
            return False
        self._spool_path.replace(replay)
        self._reader = _SpoolReader(replay, self._batch_size * _BACKLOG_FACTOR)
        return True

    @staticmethod
    def _take_adopted(adopt: Callable[[], list[Path]], spool: Path) -> None:
        """Append the spool files ``adopt`` claims to this process's spool."""
        adopted = adopt()
        for path in adopted:
            _move_into(path, spool)
        if adopted:
            log.info("adopted %d usage spool files of stopped processes", len(adopted))

    async def _replay_file(self, *, retry: bool) -> None:
        """Write the replay file chunk by chunk (memory stays bounded whatever its size),
        then remove it. Without ``retry`` the first failure is raised, the failed chunk
        kept in ``self._replay`` and the reader where it was, for the writer to go on."""
        reader = self._reader
        assert reader is not None
        while True:
            if not self._replay:
                self._replay = await asyncio.to_thread(reader.next_chunk)
                if not self._replay:
                    break
            if retry:
                await self._write(self._replay)
            else:
                await self._store.insert_many(self._replay)
                self.written += len(self._replay)
            self._replay = []
        reader.close()
        self._reader = None
        try:
            reader.path.unlink(missing_ok=True)
        except OSError:  # replaying it again later is harmless
            log.exception("could not remove replayed usage spool %s", reader.path)
        else:
            log.info("replayed %d usage records from %s", reader.records, reader.path)

    async def _write(self, records: list[UsageRecord]) -> None:
        """Write ``records`` in batches, retrying each until it succeeds (or we're cancelled);
        records the database refuses for good are set aside."""
        step = self._batch_size * _BACKLOG_FACTOR
        for i in range(0, len(records), step):
            await self._write_chunk(records[i : i + step])

    async def _write_chunk(self, chunk: list[UsageRecord]) -> None:
        delay = self._retry_initial
        while True:
            try:
                await self._store.insert_many(chunk)
                self.written += len(chunk)
                self._last_write = time.time()
                return
            except Exception as exc:
                if refused_for_good(exc):
                    await self._set_aside(chunk, exc)
                    return
                self._failed(exc, len(chunk), f"writing usage; retrying in {delay:.2f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)

    async def _set_aside(self, chunk: list[UsageRecord], exc: Exception) -> None:
        """The database refused ``chunk`` for good: halve it until the refused records are
        alone, write the others, send those to the dead-letter file (a batch holding one
        bad record costs about two writes per halving: 2 log2(n))."""
        if len(chunk) == 1:
            self._dead_letters.add(chunk[0], exc)
            self.dead_lettered += 1
            if self._on_dead_letter is not None:
                try:
                    self._on_dead_letter(1)
                except Exception:
                    log.exception("usage recorder on_dead_letter callback failed")
            return
        if self._bisecting:  # a half of a batch already being searched
            half = len(chunk) // 2
            await self._write_chunk(chunk[:half])
            await self._write_chunk(chunk[half:])
            return
        log.warning(
            "the database refused a batch of %d usage records (%s: %s); "
            "looking for the records it refuses",
            len(chunk),
            type(exc).__name__,
            exc,
        )
        self._bisecting = True
        try:
            await self._set_aside(chunk, exc)
        finally:
            self._bisecting = False

    def _failed(self, exc: Exception, count: int, doing: str) -> None:
        self.failures += 1
        log.warning("%s (%d records): %s: %s", doing, count, type(exc).__name__, exc)
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:
                log.exception("usage recorder on_error callback failed")

    def _late(self, rec: UsageRecord) -> None:
        """A record after close(): straight to the spool, or logged as lost."""
        try:
            self._spool([rec])
        except OSError:
            log.exception("usage record %s lost: recorder closed, spool failed", rec.request_id)

    def _replay_path(self) -> Path:
        assert self._spool_path is not None
        return self._spool_path.with_name(self._spool_path.name + ".replay")

    def _spool(self, records: list[UsageRecord], replay: str = "on start") -> None:
        if self._spool_path is None:
            log.error(
                "usage recorder closed with %d records unwritten and no spool file: they are lost",
                len(records),
            )
            return
        self._spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_path.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec.to_json(), separators=(",", ":")) + "\n")
        log.error(
            "database unavailable: spooled %d usage records to %s for replay %s",
            len(records),
            self._spool_path,
            replay,
        )


def _move_into(source: Path, spool: Path) -> None:
    """Append ``source`` to ``spool`` (JSON lines) and remove it; a rename when no spool."""
    if not spool.exists():
        source.replace(spool)
        return
    with source.open("rb") as src, spool.open("ab") as dst:
        if dst.tell() and not _ends_with_newline(spool):
            dst.write(b"\n")  # a torn last line stays alone
        shutil.copyfileobj(src, dst)
    source.unlink()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


class _SpoolReader:
    """Reads a spool file (JSON lines) in chunks, from a worker thread; skips bad lines."""

    def __init__(self, path: Path, chunk: int) -> None:
        self.path = path
        self._chunk = chunk
        self._file: IO[str] | None = None
        self._line = 0
        self.records = 0

    def next_chunk(self) -> list[UsageRecord]:
        if self._file is None:
            self._file = self.path.open(encoding="utf-8")
        records: list[UsageRecord] = []
        while len(records) < self._chunk:
            line = self._file.readline()
            if not line:
                break
            self._line += 1
            if not line.strip():
                continue
            try:
                records.append(UsageRecord.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:  # a torn last line, say
                log.error("skipping bad line %d of usage spool %s: %s", self._line, self.path, exc)
        self.records += len(records)
        return records

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
