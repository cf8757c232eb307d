"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.lifecycle import Lifecycle
from sluice.observability.metrics import render_metrics


class HealthRoutes:
    def __init__(self, lifecycle: Lifecycle, registry: CollectorRegistry) -> None:
        self._lifecycle = lifecycle
        self._registry = registry

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"alive"}', media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        phase = self._lifecycle.phase.value
        status = 200 if self._lifecycle.is_ready else 503
        return Response(f'{{"status":"{phase}"}}', status, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        body, content_type = render_metrics(self._registry)
        return Response(body, media_type=content_type)
