"""The batch worker: every process claims batch lines and runs them through the request
pipeline, as interactive requests run, at a lower priority and within a share of each
model's capacity.

A line becomes a request as the HTTP layer would make it (its body the line's ``body``,
its caller the batch's owner), entering the pipeline after identification: admission
(limits, budgets), planning, the cache, attempts and the backend all apply. Its usage
record (request id ``<batch id>-<line>``, the batch's id on it) is written to the database
before its answer is: a worker that dies in between leaves a line that runs again, and its
second record, with the same request id, is not written again (usage inserts are
idempotent by request id), so each line is charged once, whatever happens to its worker.
(The upstream may then have been called twice; the key is charged once.)

A line the gateway refuses before any upstream call (429: the key's RPM, TPM or parallel
limit, its budget; 503: every deployment at capacity) is not an answer: it goes back to the
queue and the worker waits before claiming again. Every ``housekeeping`` seconds a worker
also queues again lines whose lease ran out, closes the queued lines of batches past their
window, and finalises the batches that have no line left to run (output and error files,
final status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson

from sluice.backends.base import UpstreamReply
from sluice.batches.files import FileStore
from sluice.batches.metrics import BatchMetrics
from sluice.batches.owners import ANYONE
from sluice.batches.settings import BatchSettings
from sluice.batches.store import BatchRecord, BatchStore, Claim, Outcome
from sluice.batches.validate import ENDPOINTS
from sluice.errors import (
    AuthenticationError,
    ServiceUnavailableError,
    SluiceError,
)
from sluice.keys.store import KeyStore
from sluice.pipeline.accounting import Accounting
from sluice.pipeline.auth import MASTER, Principal
from sluice.pipeline.context import RequestContext
from sluice.pipeline.reply import StreamReply
from sluice.pipeline.steps import Handler
from sluice.routing.router import Router
from sluice.store.periods import utcnow
from sluice.store.usage import UsageStore, now_micros

log = logging.getLogger("sluice.batches")
_KEY_TTL = 5.0  # seconds a batch owner's key record is reused (revocations reach it then)
_SPOOL_BYTES = 8 * 1024 * 1024  # an output file's bytes held in memory before going to disk
_PUBLISH_EVERY = 15.0  # seconds between counts of open lines for the metrics
_MAX_REMEMBERED = 10_000  # batch owners and principals kept; past it, forgotten and re-read


@dataclass(slots=True)
class _Owner:
    key_id: str | None
    endpoint: str


class BatchRunner:
    def __init__(
        self,
        settings: BatchSettings,
        store: BatchStore,
        files: FileStore,
        pipeline: Handler,
        router: Router,
        accounting: Accounting,
        usage: UsageStore | None,
        keys: KeyStore | None,
        metrics: BatchMetrics,
        *,
        authenticated: bool,
    ) -> None:
        self._settings = settings
        self._store = store
        self._files = files
        self._pipeline = pipeline  # entered after identification
        self._router = router
        self._accounting = accounting
        self._usage = usage
        self._keys = keys
        self._metrics = metrics
        self._authenticated = authenticated
        self.worker = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self._running: set[asyncio.Task[None]] = set()
        self._by_model: dict[str, int] = {}
        self._turns: dict[str, asyncio.Condition] = {}
        self._owners: dict[str, _Owner] = {}
        self._principals: dict[str | None, tuple[float, Principal | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        self._idle = settings.poll_interval
        self._stopping = False
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._last_published = 0.0
        self._next_line = 0.0  # with max_lines_per_second: when the pace lets a line start
        self._last_housekeeping = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch worker")

    async def close(self) -> None:
        """Stop claiming; give the lines under way ``drain`` seconds, then abandon them
        (their leases lapse and another worker runs them)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            _, pending = await asyncio.wait(self._running, timeout=self._settings.drain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        """A batch was created here: look for lines now, not after an idle wait."""
        self._idle = self._settings.poll_interval
        self._woken.set()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                claimed = await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away: try again later, never die
                log.exception("batch worker turn failed; retrying")
                claimed = 0
            if claimed:
                self._idle = self._settings.poll_interval
                continue
            paced = self._next_line - time.monotonic()
            if paced > 0 and len(self._running) < self._settings.concurrency:
                # Held back by the pace, not idle: claim again when it lets a line start
                # (or sooner, for the sweeps of a slow pace).
                await asyncio.sleep(min(paced, self._settings.housekeeping))
                continue
            if len(self._running) >= self._settings.concurrency:
                # Busy, not idle: claim again as soon as a line finishes.
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self._settings.poll_interval)
                continue
            # Idle: look again after a wait that doubles up to max_poll_interval, so an idle
            # gateway costs its database a query every few seconds.
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self._idle)
            self._idle = min(self._idle * 2, self._settings.max_poll_interval)

    async def _turn(self) -> int:
        clock = time.monotonic()
        if clock - self._last_housekeeping >= self._settings.housekeeping:
            self._last_housekeeping = clock
            await self._housekeeping()
        free = self._allowance(self._settings.concurrency - len(self._running), clock)
        if free <= 0:
            return 0
        now = utcnow()
        claims = await self._store.claim(self.worker, free, now + self._lease, now)
        self._paced(len(claims), clock)
        for claim in claims:
            task = asyncio.create_task(self._run(claim))
            self._running.add(task)
            task.add_done_callback(self._line_done)
        return len(claims)

    def _allowance(self, free: int, clock: float) -> int:
        """The lines that may start now: ``free``, or fewer under ``max_lines_per_second``
        (those the pace owes since it last let one start, at least one once it is due)."""
        rate = self._settings.max_lines_per_second
        if rate is None or free <= 0:
            return free
        if clock < self._next_line:
            return 0
        return min(free, 1 + int((clock - self._next_line) * rate))

    def _paced(self, started: int, clock: float) -> None:
        """``started`` lines began at ``clock``: move the pace on. A worker that was idle
        may start at most ``concurrency`` lines at once, not the seconds it slept."""
        rate = self._settings.max_lines_per_second
        if rate is None or started == 0:
            return
        earliest = clock - (self._settings.concurrency - 1) / rate
        self._next_line = max(self._next_line, earliest) + started / rate

    def _line_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._woken.set()  # a place is free
        if not task.cancelled() and task.exception() is not None:
            log.error("a batch line failed in the worker", exc_info=task.exception())

    async def _housekeeping(self) -> None:
        now = utcnow()
        lapsed = await self._store.requeue_lapsed(now, self._settings.max_attempts)
        if lapsed:
            self._metrics.lease_expiries.inc(lapsed)
        await self._store.expire_due(now)
        await self._store.close_unclaimable()
        for batch in await self._store.take_finalization(now):
            await self._finalise(batch)
        clock = time.monotonic()
        if clock - self._last_published >= _PUBLISH_EVERY:
            # Counting every open line is a scan: not at every sweep.
            self._last_published = clock
            self._metrics.publish(await self._store.line_counts())

    async def _run(self, claim: Claim) -> None:
        renewal = asyncio.create_task(self._keep_lease(claim))
        try:
            await self._run_line(claim)
        finally:
            renewal.cancel()

    async def _keep_lease(self, claim: Claim) -> None:
        """Renew the line's lease while it runs (it may wait for a place, then for a slow
        upstream): a line outliving its lease would run again elsewhere."""
        every = self._settings.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):  # the database away: the lease may lapse
                await self._store.renew(claim, self.worker, utcnow() + self._lease)

    async def _run_line(self, claim: Claim) -> None:
        owner = await self._owner(claim.batch_id)
        model = _model_of(claim.body)
        async with self._share(model):
            started = time.perf_counter()
            ctx = RequestContext(
                request_id=f"{claim.batch_id}-{claim.line}",
                started=started,
                route=ENDPOINTS[owner.endpoint],
                created_us=now_micros(),
                batch_id=claim.batch_id,
            )
            ctx.headers = []
            ctx.receive = _body_of(claim.body)
            status, body, refusal = await self._answer(ctx, owner)
        if refusal is not None and not ctx.accepted:
            # Refused for now before any upstream call (the key's rate limit, every
            # deployment full): not an answer. Back to the queue, held back a while; other
            # batches' lines go first meanwhile.
            wait = max(refusal, self._settings.retry_after)
            await self._store.release(claim, self.worker, utcnow() + timedelta(seconds=wait))
            self._metrics.requeued.inc()
            return
        if ctx.accepted and self._usage is not None:
            latency = time.perf_counter() - started
            await self._usage.insert_many([self._accounting.record_of(ctx, status, latency)])
        written = await self._store.finish_line(
            claim,
            self.worker,
            status_code=status,
            result=_json_text(body),
            request_id=ctx.request_id,
        )
        if written:
            self._metrics.lines.labels("done" if status == 200 else "failed").inc()
        else:
            self._metrics.lost_leases.inc()

    async def _answer(self, ctx: RequestContext, owner: _Owner) -> tuple[int, bytes, float | None]:
        """The line's status and body, as the HTTP layer would have sent them; and, for a
        refusal that a later try may not meet, the seconds to hold the line back."""
        try:
            ctx.principal = await self._principal(owner.key_id)
            reply = await self._pipeline(ctx)
            if isinstance(reply, StreamReply):  # validation refuses streams; be safe
                await reply.close()
                raise ServiceUnavailableError("A batch line cannot stream.")
            assert isinstance(reply, UpstreamReply)
            return reply.status, reply.body, None
        except SluiceError as error:
            ctx.error_kind = error.kind
            return error.http_status, error.body(), _held_back(error, ctx)
        except Exception:  # the gateway's own fault: an answer, not a crash of the worker
            log.exception("batch line %s-%s failed in the gateway", ctx.batch_id, ctx.request_id)
            failure = SluiceError("The server had an error while processing your request.")
            ctx.error_kind = failure.kind
            return failure.http_status, failure.body(), None
        finally:
            for finish in ctx.at_end or ():
                finish(ctx)

    async def _principal(self, key_id: str | None) -> Principal | None:
        """The batch owner as the pipeline sees a caller: its key record (revoked or
        expired keys fail their lines with 401), the master key, or nobody (no keys)."""
        if not self._authenticated:
            return None
        if key_id is None:
            return MASTER
        cached = self._principals.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _KEY_TTL:
            principal = cached[1]
        else:
            assert self._keys is not None
            record = await self._keys.get(key_id)
            principal = Principal(record) if record is not None and record.active() else None
            if len(self._principals) >= _MAX_REMEMBERED:
                self._principals.clear()
            self._principals[key_id] = (now, principal)
        if principal is None:
            raise AuthenticationError(
                "The API key that created this batch was revoked or has expired.",
                code="invalid_api_key",
            )
        return principal

    async def _owner(self, batch_id: str) -> _Owner:
        owner = self._owners.get(batch_id)
        if owner is None:
            batch = await self._store.get(batch_id, ANYONE)
            assert batch is not None
            if len(self._owners) >= _MAX_REMEMBERED:
                self._owners.clear()
            owner = self._owners[batch_id] = _Owner(batch.key_id, batch.endpoint)
        return owner

    @contextlib.asynccontextmanager
    async def _share(self, model: str | None) -> Any:
        """Hold one of the batch's places on ``model``: at most ``share`` of its
        deployments' capacity (at least one) runs batch lines at once, in this process."""
        key = model or ""
        turn = self._turns.setdefault(key, asyncio.Condition())
        async with turn:
            await turn.wait_for(lambda: self._by_model.get(key, 0) < self._limit(model))
            self._by_model[key] = self._by_model.get(key, 0) + 1
        try:
            yield
        finally:
            self._by_model[key] -= 1
            async with turn:
                turn.notify()

    def _limit(self, model: str | None) -> int:
        if model is None or not self._router.knows(model):
            return 1
        try:
            plan = self._router.plan(model)
        except KeyError:
            return 1
        capacity = 0
        for deployment in plan.candidates:
            cap = deployment.capacity.limit if deployment.capacity is not None else None
            capacity += cap or deployment.max_concurrency or self._settings.concurrency
        return max(1, math.floor(capacity * self._settings.share))

    async def _finalise(self, batch: BatchRecord) -> None:
        """Write the output and error files of a batch whose lines have all ended, and give
        it its last status. The files are written as the answers are read, a page at a
        time, through temporary files (a batch's answers may not fit in memory)."""
        with (
            tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as output,
            tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as errors,
        ):
            async for outcome in self._store.outcomes(batch.id):
                done = outcome.state == "done"
                (output if done else errors).write(_output_line(batch.id, outcome) + b"\n")
            ids: list[str | None] = []
            for content, suffix in ((output, "output"), (errors, "error")):
                if not content.tell():
                    ids.append(None)
                    continue
                content.seek(0)
                written = await self._files.create(
                    batch.key_id, "batch_output", f"{batch.id}_{suffix}.jsonl", content
                )
                ids.append(written.id)
        await self._store.close(batch, output_file_id=ids[0], error_file_id=ids[1], now=utcnow())
        self._owners.pop(batch.id, None)
        self._metrics.batches.labels("finalised").inc()


def _output_line(batch_id: str, outcome: Outcome) -> bytes:
    """One line of the output or error file, in OpenAI's format."""
    line: dict[str, Any] = {
        "id": f"batch_req_{batch_id.removeprefix('batch_')}_{outcome.line}",
        "custom_id": outcome.custom_id,
    }
    if outcome.state in ("done", "failed"):
        line["response"] = {
            "status_code": outcome.status_code,
            "request_id": outcome.request_id,
            "body": orjson.Fragment(outcome.result or "null"),
        }
        line["error"] = None
    else:
        line["response"] = None
        line["error"] = {
            "code": f"batch_{outcome.state}",
            "message": f"The line did not run: the batch was {outcome.state}.",
        }
    return orjson.dumps(line)


def _held_back(error: SluiceError, ctx: RequestContext) -> float | None:
    """Seconds to hold a refused line back, when a later try may pass: a rate limit or
    a full deployment; not a budget (spent until its period ends: that is the answer)."""
    if error.http_status not in (429, 503) or error.code == "budget_exceeded":
        return None
    admission = ctx.admission
    return admission.retry_after if admission is not None and not admission.allowed else 0.0


def _json_text(body: bytes) -> bytes:
    """The answer as JSON text for the output file: an upstream's body that is not JSON
    (a proxy's error page) is kept as a JSON string, so the file stays one JSON a line."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return orjson.dumps(body.decode(errors="replace"))
    return body


def _model_of(body: bytes) -> str | None:
    try:
        model = orjson.loads(body).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _body_of(body: bytes) -> Callable[[], Awaitable[MutableMapping[str, Any]]]:
    """An ASGI ``receive`` that hands the request step the line's body."""

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
