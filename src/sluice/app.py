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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from types import FrameType
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from sluice.api.admin import AdminGate, admin_router, docs_access
from sluice.api.document import install_openapi
from sluice.api.edge import EdgeChecks, served_hosts
from sluice.api.errors import ERROR_HANDLERS, install_error_handlers
from sluice.api.health import HealthRoutes
from sluice.api.middleware import ObserveRequests
from sluice.api.openai import OpenAIService
from sluice.backends.registry import default_providers
from sluice.keys import KeyService
from sluice.lifecycle import Lifecycle, Phase
from sluice.observability.listener import MetricsListener
from sluice.observability.logging import AccessLog, configure_logging
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.attempts import Attempts
from sluice.pipeline.backend import call_backend
from sluice.pipeline.plan import MakePlan
from sluice.pipeline.request import ReadRequest
from sluice.pipeline.steps import Handler, Step, compose
from sluice.routing.capacity import LoadShedding
from sluice.routing.router import Router
from sluice.routing.table import build_table
from sluice.services import Services, build_services
from sluice.settings import Settings, load_settings

CONFIG_ENV = "SLUICE_CONFIG"


_GC_YOUNG_THRESHOLD = 20_000
_EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    *(
        f"x-ratelimit-{part}-{unit}"
        for part in ("limit", "remaining", "reset")
        for unit in ("requests", "tokens")
    ),
]


def build_app(settings: Settings) -> Starlette:
    """The ASGI app: a lean Starlette router for the hot OpenAI routes and health checks,
    with FastAPI mounted behind it for the admin API and the OpenAPI docs (``/docs``)."""
    lifecycle = Lifecycle()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    services = build_services(settings, metrics)
    # One per process, kept across table rebuilds: the bound on waiting requests is global.
    shedding = LoadShedding(
        settings.resilience.queue, metrics, priorities=services.identify is not None
    )
    router = Router(build_table(settings, default_providers(registry), shedding))
    openai = OpenAIService(
        build_pipeline(services, router, metrics),
        router.model_names,
        metrics,
        settings.server.max_body_bytes,
        services.identify,
    )
    health = HealthRoutes(lifecycle, registry)
    access_log = AccessLog(settings.logging.access_log)
    server = settings.server
    docs = docs_access(server.docs, services.master_key, server.host)
    # With several workers the supervisor serves the metrics port (server.py).
    listener = (
        MetricsListener(server.metrics_host or server.host, server.metrics_port, registry)
        if server.metrics_port is not None and server.workers == 1
        else None
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends = router.backends()
        await services.start()
        await asyncio.gather(*(backend.start() for backend in backends))
        if listener is not None:
            listener.start()
        _drain_on_signals(lifecycle, settings.server.drain_delay)
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's scans, which otherwise cost milliseconds of tail latency under load.
        gc.freeze()
        # Requests free almost everything they allocate by reference counting; with the
        # default threshold (700 net allocations) the young generation was collected every
        # ~3 ms at 6,000 req/s, each collection (~0.14 ms) walking the in-flight requests'
        # objects: about 5% of the CPU for nothing. Cycles are still collected, just later.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        lifecycle.ready()
        try:
            yield
        finally:
            # uvicorn has drained every connection by now: nothing records usage any more.
            lifecycle.stop()
            if listener is not None:
                listener.close()
            await asyncio.gather(*(backend.close() for backend in backends))
            await services.close()
            access_log.flush()

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
    install_error_handlers(api)
    install_openapi(api, router.model_names)

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
        routes=[*openai.routes(), *health_routes],
        lifespan=lifespan,
        exception_handlers=ERROR_HANDLERS,
        middleware=[
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
    app.state.services = services
    return app


def build_pipeline(services: Services, router: Router, metrics: GatewayMetrics) -> Handler:
    """The request pipeline: each step wraps the next (`sluice.pipeline.steps`). Steps a
    configuration does not use are left out, not skipped per request."""
    steps: list[Step] = []
    if services.identify is not None:
        steps.append(services.identify)
    steps.append(ReadRequest(router.knows))
    if services.admit is not None:
        steps.append(services.admit)
    # The cache step goes here: after admission (hits are still limited and recorded),
    # before planning (a hit needs no deployment).
    steps += [MakePlan(router), Attempts(metrics)]
    return compose(steps, call_backend)


def app_from_environment() -> Starlette:
    """Factory for worker processes: settings come from ``SLUICE_CONFIG`` and ``SLUICE_*``."""
    settings = load_settings(os.environ.get(CONFIG_ENV) or None)
    configure_logging(settings.logging.level)
    return build_app(settings)


def _drain_on_signals(lifecycle: Lifecycle, delay: float) -> None:
    """On SIGTERM/SIGINT: readiness false at once, stop accepting ``delay`` seconds later.

    uvicorn installs its own handlers before the lifespan starts; chaining onto them here
    works the same in a single process and in every worker of a multi-process server. The
    delay lets load balancers see /readyz fail before the listening socket closes; a second
    signal skips it. Outside the main thread (a server run by a test) nothing is chained.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(
            signum: int,
            frame: FrameType | None,
            previous: Callable[[int, FrameType | None], Any] = previous,
        ) -> None:
            def stop() -> None:
                lifecycle.stop()
                previous(signum, frame)

            if lifecycle.phase is Phase.DRAINING or delay <= 0:
                stop()
            else:
                lifecycle.drain()
                loop.call_later(delay, stop)

        with suppress(ValueError):
            signal.signal(sig, handler)
