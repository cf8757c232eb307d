"""The stateful services behind the request path, built from settings and started together.

    database  ─ KeyStore, UsageStore ─ UsageRecorder (batched, durable writes)
    redis     ─ RedisLimiter, KeyInvalidation (pub/sub)      (MemoryLimiter without Redis)
    auth      ─ Authenticator ─ Identify, Admit (pipeline steps) (only with auth.master_key)
              ─ Accounting (usage records)

The database is opened when keys are enabled, usage is recorded or batches are served
(files and batches live in it); Redis only when ``redis_url`` is set. Shutdown order
matters: the recorder drains into the database before the database closes, so no usage
record is lost on SIGTERM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sluice.keys.invalidation import KeyInvalidation
from sluice.keys.store import KeyStore
from sluice.observability.metrics import GatewayMetrics
from sluice.observability.outages import OutageLog
from sluice.pipeline.accounting import Accounting
from sluice.pipeline.admit import Admit
from sluice.pipeline.auth import Authenticator
from sluice.pipeline.auth_failures import AddressLockout, UnknownKeys
from sluice.pipeline.budgets import BudgetLedger, MemoryBudgets, RedisBudgets
from sluice.pipeline.costs import Rates, price_table
from sluice.pipeline.identify import Identify
from sluice.pipeline.limits import Limiter, MemoryLimiter, RedisLimiter
from sluice.pipeline.limits.wire import PipelinedRedis
from sluice.settings import OpenAIDeployment, Settings, resolve_secret, resolve_url
from sluice.store.database import Database, default_database_url
from sluice.store.recorder import UsageRecorder
from sluice.store.spools import adopt_orphans, spool_path
from sluice.store.usage import UsageStore

log = logging.getLogger("sluice.services")
# The in-process limiter's lease: only a backstop (its settles cannot be lost; with Redis
# the lease is limits.redis_lease_seconds, renewed while the request runs).
MEMORY_LEASE_SECONDS = 900.0
# The shortest lease of a budget hold on Redis; see _budget_lease.
BUDGET_LEASE_SECONDS = 900.0


@dataclass
class Services:
    limiter: Limiter
    invalidation: KeyInvalidation
    accounting: Accounting
    database: Database | None = None
    redis: aioredis.Redis | None = None
    limiter_redis: PipelinedRedis | None = None
    keys: KeyStore | None = None
    usage: UsageStore | None = None
    recorder: UsageRecorder | None = None
    identify: Identify | None = None
    admit: Admit | None = None
    master_key: str | None = None
    limiter_outages: OutageLog | None = None  # the Redis limiter's failures, throttled
    budgets: BudgetLedger | None = None
    auth_lockout: AddressLockout | None = None  # failed authentications per client address
    prices: dict[str, Rates] = field(default_factory=dict)
    """Model (and alias) -> rates, shared by admission and accounting; a reload replaces
    its contents in place."""

    async def start(self) -> None:
        if self.database is not None:
            await self.database.start()
        if self.recorder is not None:
            await self.recorder.start()
        await self.invalidation.start()

    async def close(self) -> None:
        await self.invalidation.close()
        if self.recorder is not None:
            await self.recorder.close()
        if self.database is not None:
            await self.database.close()
        await self.limiter.close()
        if self.budgets is not None:
            await self.budgets.close()
        if self.limiter_outages is not None:
            self.limiter_outages.flush()
        if self.limiter_redis is not None:
            await self.limiter_redis.close()
        if self.redis is not None:
            await self.redis.aclose()


def build_services(settings: Settings, metrics: GatewayMetrics) -> Services:
    master_key = resolve_secret(settings.auth.master_key)
    redis = _redis(settings.redis_url)
    limiter_redis = _limiter_redis(settings.redis_url)
    limiter: Limiter
    outages: OutageLog | None = None
    lease_seconds = MEMORY_LEASE_SECONDS
    if limiter_redis is not None:
        lease_seconds = settings.limits.redis_lease_seconds
        outages = limiter_log = _limiter_outages(settings.limits.redis_failure)
        limiter = RedisLimiter(
            limiter_redis,
            failure_mode=settings.limits.redis_failure,
            on_failure=lambda exc: _limiter_failed(metrics, limiter_log, exc),
        )
    else:
        limiter = MemoryLimiter()
    prices = price_table(settings.models, settings.aliases)

    if master_key is None and not settings.usage.enabled and not settings.batches.enabled:
        return Services(
            limiter,
            KeyInvalidation(redis, lambda _: None),
            Accounting(None, prices),
            redis=redis,
            limiter_redis=limiter_redis,
            limiter_outages=outages,
            prices=prices,
        )

    data_dir = Path(settings.data_dir).expanduser()
    database = database_for(settings)
    keys, usage = KeyStore(database), UsageStore(database)
    recorder = None
    if settings.usage.enabled:
        spool = spool_path(data_dir)  # one per process (several workers: see store.spools)
        recorder = UsageRecorder(
            usage,
            batch_size=settings.usage.batch_size,
            flush_interval=settings.usage.flush_interval,
            max_buffered=settings.usage.max_buffered,
            spool_path=spool,
            adopt=partial(adopt_orphans, spool),
            on_error=lambda exc: metrics.usage_write_failures.inc(),
            dead_letter_path=data_dir / "usage-dead-letter.jsonl",
            on_dead_letter=metrics.usage_dead_letter.inc,
            on_restart=metrics.usage_writer_restarts.inc,
            on_progress=metrics.usage_progress,
        )
    identify = admit = None
    authenticator = None
    budgets: BudgetLedger | None = None
    lockout = None
    if master_key is not None:
        budgets = _budgets(settings, redis, metrics, outages)
        auth = settings.auth
        lockout = AddressLockout(auth.failure_limit, auth.failure_window, auth.failure_addresses)
        authenticator = Authenticator(
            keys,
            master_key,
            auth.key_cache_ttl,
            unknown_keys=UnknownKeys(auth.unknown_key_cache, auth.unknown_key_ttl),
            lockout=lockout,
        )
        identify = Identify(authenticator)
        admit = Admit(
            limiter,
            default_max_tokens=settings.limits.default_max_tokens,
            lease_seconds=lease_seconds,
            budgets=budgets,
            prices=prices,
        )
    invalidation = KeyInvalidation(
        redis, authenticator.invalidate if authenticator is not None else lambda _: None
    )
    return Services(
        limiter=limiter,
        invalidation=invalidation,
        accounting=Accounting(recorder, prices),
        database=database,
        redis=redis,
        limiter_redis=limiter_redis,
        keys=keys,
        usage=usage,
        recorder=recorder,
        identify=identify,
        admit=admit,
        master_key=master_key,
        auth_lockout=lockout,
        limiter_outages=outages,
        budgets=budgets,
        prices=prices,
    )


def _budgets(
    settings: Settings,
    redis: aioredis.Redis | None,
    metrics: GatewayMetrics,
    outages: OutageLog | None,
) -> BudgetLedger:
    """The budget ledger: shared on Redis when there is one (as the limits are)."""
    if redis is None:
        return MemoryBudgets()
    log_to = outages or _limiter_outages(settings.limits.redis_failure)
    return RedisBudgets(
        redis,
        lease_seconds=_budget_lease(settings),
        failure_mode=settings.limits.redis_failure,
        on_failure=lambda exc: _limiter_failed(metrics, log_to, exc),
    )


def _budget_lease(settings: Settings) -> float:
    """How long a budget hold on Redis lives when its release is lost: longer than any
    request may run (the longest upstream total timeout, plus the write deadline of a
    client that stopped reading, plus a margin), so a hold never lapses under a request
    still running. The embedded engine's requests are bounded by their token ceilings."""
    totals = [
        deployment.timeout.total
        for model in settings.models
        for deployment in model.deployments
        if isinstance(deployment, OpenAIDeployment)
    ]
    longest = max(totals, default=0.0) + settings.server.write_timeout + 60.0
    return max(BUDGET_LEASE_SECONDS, longest)


def database_for(settings: Settings) -> Database:
    """The configured database, or SQLite under the data directory."""
    default = default_database_url(Path(settings.data_dir).expanduser())
    return Database(resolve_url(settings.database_url) or default, migrations=settings.migrations)


def redis_for(settings: Settings) -> aioredis.Redis | None:
    return _redis(settings.redis_url)


def _redis(url: str | None) -> aioredis.Redis | None:
    """A client that waits for a pooled connection instead of failing past the pool size,
    and gives up quickly (no retries) so the configured failure mode applies within 0.5 s."""
    resolved = resolve_url(url)
    if resolved is None:
        return None
    pool = aioredis.BlockingConnectionPool.from_url(
        resolved,
        max_connections=512,
        timeout=0.5,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


def _limiter_redis(url: str | None) -> PipelinedRedis | None:
    """The limiter's own connection: one pipelined socket, far cheaper per call than redis-py."""
    resolved = resolve_url(url)
    return PipelinedRedis(resolved, timeout=0.5) if resolved is not None else None


def _limiter_outages(mode: str) -> OutageLog:
    outcome = "admitting requests" if mode == "open" else "refusing requests with 503"
    return OutageLog(log, f"rate limiter unavailable ({outcome}, fail {mode})")


def _limiter_failed(metrics: GatewayMetrics, outages: OutageLog, exc: Exception) -> None:
    metrics.limiter_failures.inc()  # every failure; the log line is throttled
    outages.failed(exc)
