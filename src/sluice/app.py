"""build_app(settings): the one place where Sluice's services are created and wired.

Everything with a lifetime (upstream pools, local engines) is started in the lifespan and
closed when it ends; the app holds no module-level state, so tests build as many as they
like side by side.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from sluice.api.admin import AdminGate, admin_router, docs_access
from sluice.api.admin_routing import routing_admin_router
from sluice.api.document import install_openapi
from sluice.api.edge import EdgeChecks, served_hosts
from sluice.api.errors import ERROR_HANDLERS, install_error_handlers
from sluice.api.health import HealthRoutes
from sluice.api.middleware import ObserveRequests
from sluice.api.openai import OpenAIService
from sluice.backends.registry import default_providers
from sluice.batches.build import build_batches
from sluice.cache.admin import cache_admin_router
from sluice.cache.build import build_cache
from sluice.cache.step import CacheStep
from sluice.keys.service import KeyService
from sluice.lifecycle import Lifecycle, Phase
from sluice.observability.listener import MetricsListener
from sluice.observability.logging import AccessLog, configure_logging
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.attempts import Attempts
from sluice.pipeline.backend import call_backend
from sluice.pipeline.costs import Rates, price_table
from sluice.pipeline.plan import MakePlan
from sluice.pipeline.request import ReadRequest
from sluice.pipeline.shadow import Shadow, ShadowLink, ShadowTraffic
from sluice.pipeline.steps import Handler, Step, StepTracer, compose
from sluice.routing.capacity import LoadShedding
from sluice.routing.monitor import HealthMonitor
from sluice.routing.reload import ConfigSource, Reloader
from sluice.routing.router import Router
from sluice.routing.settings import RetrySettings
from sluice.routing.table import build_table
from sluice.routing.watch import ConfigWatcher
from sluice.services import Services, build_services
from sluice.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from sluice.observability.tracing import Tracing

CONFIG_ENV = "SLUICE_CONFIG"


_GC_YOUNG_THRESHOLD = 20_000
_EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    "x-sluice-deployment",
    "x-sluice-model",
    "x-sluice-attempts",
    "x-sluice-cache",
    *(
        f"x-ratelimit-{part}-{unit}"
        for part in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    ),
]


def build_app(settings: Settings, source: ConfigSource | None = None) -> Starlette:
    """The ASGI app: a lean Starlette router for the hot OpenAI routes and health checks,
    with FastAPI mounted behind it for the admin API and the OpenAPI docs (``/docs``).

    ``source`` says where ``settings`` came from, for a reload (SIGHUP, ``POST
    /admin/reload``); without one a reload is refused."""
    lifecycle = Lifecycle()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    tracing = _tracing(settings)
    providers = default_providers(registry, tracing.sequences if tracing is not None else None)
    services = build_services(settings, metrics)
    # One per process, kept across table rebuilds: the bound on waiting requests is global.
    shedding = LoadShedding(
        settings.resilience.queue, metrics, priorities=services.identify is not None
    )
    router = Router(build_table(settings, providers, metrics=metrics, shedding=shedding).table)
    monitor = HealthMonitor(router, metrics, settings.resilience.health.probe_interval)
    shadows = ShadowTraffic(router, metrics)
    cache = build_cache(settings, router, registry, services.redis)
    pipeline, shadow_link, after_identify = build_pipeline(
        services,
        router,
        metrics,
        shadows,
        settings.server.max_body_bytes,
        settings.resilience.retries,
        cache.step if cache is not None else None,
        tracing,
    )
    batches = build_batches(settings, services, router, registry, after_identify)
    reloader = Reloader(
        settings,
        source or ConfigSource(None),
        router,
        providers,
        metrics,
        on_swap=[shadow_link.update],
        on_reload=[
            partial(_reprice, services.prices),
            *([cache.reconfigure] if cache is not None else []),
        ],
        shedding=shedding,
    )
    openai = OpenAIService(
        pipeline,
        lambda: router.model_names,
        metrics,
        services.identify,
    )
    health = HealthRoutes(lifecycle, registry)
    access_log = (
        AccessLog(settings.logging.access_log)
        if tracing is None
        else tracing.access_log(settings.logging.access_log)
    )
    server = settings.server
    docs = docs_access(server.docs, services.master_key, server.host)
    # With several workers the supervisor serves the metrics port (server.py).
    listener = (
        MetricsListener(server.metrics_host or server.host, server.metrics_port, registry)
        if server.metrics_port is not None and server.workers == 1
        else None
    )

    config_path = reloader.source.path
    watcher = (
        ConfigWatcher(config_path, server.watch_config, reloader.signalled)
        if server.watch_config > 0 and config_path is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        await asyncio.gather(*(backend.start() for backend in router.backends()))
        monitor.start()
        if cache is not None:
            cache.start()
        if batches is not None:
            batches.start()
        if listener is not None:
            listener.start()
        _drain_on_signals(lifecycle, settings.server.drain_delay)
        reload_on_hangup = _reload_on_sighup(reloader)
        if watcher is not None:
            watcher.start()
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's scans, which otherwise add to tail latency under load.
        gc.freeze()
        # Requests free almost everything they allocate by reference counting; with the
        # default threshold (700 net allocations) the young generation was collected many
        # times a second under load, each collection walking the in-flight requests' objects
        # for nothing (docs/architecture.md). Cycles are still collected, just later.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        lifecycle.ready()
        try:
            yield
        finally:
            # uvicorn has drained every connection by now: nothing records usage any more.
            lifecycle.stop()
            if batches is not None:
                await batches.close()  # before the database closes: lines under way finish
            if reload_on_hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                await watcher.close()
            if listener is not None:
                listener.close()
            await monitor.close()
            await shadows.close()
            await reloader.close()
            if cache is not None:
                await cache.close()
            await asyncio.gather(*(backend.close() for backend in router.backends()))
            await services.close()
            access_log.flush()
            if tracing is not None:
                tracing.close()

    api = FastAPI(
        title="Sluice",
        summary="OpenAI-compatible LLM gateway",
        redoc_url=None,
        docs_url=None if docs == "off" else "/docs",
        openapi_url=None if docs == "off" else "/openapi.json",
    )
    if services.keys is not None and services.usage is not None:
        key_service = KeyService(services.keys, services.invalidation)
        api.include_router(
            admin_router(key_service, services.usage, services.master_key, services.auth_lockout)
        )
    api.include_router(
        routing_admin_router(router, reloader, services.master_key, services.auth_lockout)
    )
    api.include_router(cache_admin_router(cache, services.master_key, services.auth_lockout))
    install_error_handlers(api)
    install_openapi(api, router.model_names, batches=batches is not None)

    health_routes = health.routes()
    if server.metrics_port is not None:
        health_routes = [route for route in health_routes if route.path != "/metrics"]
    edge: list[Middleware] = []  # after the door's checks (`EdgeChecks`, in ObserveRequests)
    if server.cors_origins:
        edge.append(
            Middleware(
                CORSMiddleware,
                allow_origins=server.cors_origins,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["*"],
                expose_headers=_EXPOSED_HEADERS,
            )
        )
    app = Starlette(
        routes=[*openai.routes(), *(batches.routes if batches else []), *health_routes],
        lifespan=lifespan,
        exception_handlers=ERROR_HANDLERS,
        middleware=[
            *([] if tracing is None else [tracing.middleware()]),
            Middleware(
                ObserveRequests,
                lifecycle=lifecycle,
                metrics=metrics,
                access_log=access_log,
                accounting=services.accounting,
                edge=EdgeChecks(served_hosts(server)),
            ),
            *edge,
        ],
    )
    # Everything the hot routes do not match (a 405 still wins) goes to FastAPI, through
    # the gate that checks the master key before any admin body is read.
    app.router.default = AdminGate(
        api, services.master_key, docs, server.max_admin_body_bytes, services.auth_lockout
    )
    app.state.api = api  # the FastAPI app: its openapi() is the whole document
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    app.state.router = router
    app.state.health_monitor = monitor
    app.state.reloader = reloader
    app.state.shadows = shadows
    app.state.cache = cache
    app.state.batches = batches
    app.state.services = services
    app.state.tracing = tracing
    return app


def _tracing(settings: Settings) -> Tracing | None:
    """The tracer when ``tracing.enabled``; its module (and the extra) is imported only then."""
    if not settings.tracing.enabled:
        return None
    try:
        from sluice.observability.tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            "tracing.enabled needs the tracing extra: pip install 'sluice[tracing]'"
        ) from exc
    return Tracing(settings.tracing)


def build_pipeline(
    services: Services,
    router: Router,
    metrics: GatewayMetrics,
    shadows: ShadowTraffic,
    max_body_bytes: int,
    retries: RetrySettings,
    cache: CacheStep | None = None,
    tracer: StepTracer | None = None,
) -> tuple[Handler, ShadowLink, Handler]:
    """The request pipeline: each step wraps the next (`sluice.pipeline.steps`). Steps a
    configuration does not use are left out, not skipped per request; the shadow step is
    linked in and out by its `ShadowLink` as reloads add or remove shadows. The third
    handler is the pipeline after identification, where batch lines, whose caller is
    known, enter (`sluice.batches.runner`)."""
    steps: list[Step] = []
    if services.identify is not None:
        steps.append(services.identify)
    steps.append(ReadRequest(router.knows, max_body_bytes))
    if services.admit is not None:
        steps.append(services.admit)
    plan = MakePlan(router, metrics)
    steps.append(plan)
    # The cache after admission (a hit is still limited and recorded) and after the plan
    # (its key holds the model that serves: an alias's version).
    if cache is not None:
        steps.append(cache)
    steps.append(Attempts(metrics, router, retries, services.prices))
    pipeline = compose(steps, call_backend, tracer)
    link = ShadowLink(cache or plan, Shadow(router, shadows))
    link.update(router.table)
    identify = services.identify
    return pipeline, link, identify.next if identify is not None else pipeline


def _reprice(prices: dict[str, Rates], settings: Settings) -> None:
    """Replace the price table the admit step and accounting share, in place."""
    prices.clear()
    prices.update(price_table(settings.models, settings.aliases))


def app_from_environment() -> Starlette:
    """Factory for worker processes: settings come from ``SLUICE_CONFIG`` and ``SLUICE_*``
    (the supervisor puts its command-line values there, `sluice.server`)."""
    path = os.environ.get(CONFIG_ENV) or None
    settings = load_settings(path)
    configure_logging(settings.logging.level)
    return build_app(settings, ConfigSource(path, supervised=settings.server.workers > 1))


def _reload_on_sighup(reloader: Reloader) -> bool:
    """SIGHUP reloads the configuration (`sluice.routing.reload`). Only the main thread
    can take signals: a server run by a test in another thread gets none (False)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.signalled)
    return True


def _drain_on_signals(lifecycle: Lifecycle, delay: float) -> None:
    """On SIGTERM/SIGINT: readiness false at once, stop accepting ``delay`` seconds later.

    uvicorn installs its own handlers before the lifespan starts; chaining onto them here
    works the same in a single process and in every worker of a multi-process server. The
    delay lets load balancers see /readyz fail before the listening socket closes; a second
    signal skips it (and a third SIGINT is uvicorn's force-quit; SIGTERM never forces).
    Outside the main thread (a server run by a test) nothing is chained.

    At the end of the delay uvicorn takes over: within its next tick (0.1 s) it closes the
    listening socket and the idle connections and lets the requests under way finish. The
    phase stays DRAINING meanwhile, so that a request arriving in that tick is served
    like the others rather than refused; the lifespan's shutdown sets STOPPING.
    """
    loop = asyncio.get_running_loop()
    # The first signal's hand-over to uvicorn, while it waits: a later signal hands over at
    # once and cancels it, or it would reach uvicorn as one signal more (a SIGINT's second
    # is a force-quit that skips the lifespan's shutdown).
    pending: list[asyncio.TimerHandle] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(
            signum: int,
            frame: FrameType | None,
            previous: Callable[[int, FrameType | None], Any] = previous,
        ) -> None:
            first = lifecycle.phase is not Phase.DRAINING
            lifecycle.drain()
            if first and delay > 0:
                pending.append(loop.call_later(delay, previous, signum, frame))
                return
            while pending:
                pending.pop().cancel()
            previous(signum, frame)

        with suppress(ValueError):
            signal.signal(sig, handler)
