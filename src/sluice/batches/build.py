"""The Files and Batch APIs and the batch worker, built once in the app (`sluice.app`)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from starlette.routing import Route

from sluice.batches.api import BatchRoutes
from sluice.batches.files import FileStore, build_file_store
from sluice.batches.files_api import FilesRoutes
from sluice.batches.metrics import BatchMetrics
from sluice.batches.runner import BatchRunner
from sluice.batches.store import BatchStore
from sluice.pipeline.steps import Handler
from sluice.routing.router import Router
from sluice.services import Services
from sluice.settings import Settings


@dataclass
class Batches:
    files: FileStore
    store: BatchStore
    runner: BatchRunner
    routes: list[Route]

    def start(self) -> None:
        self.runner.start()

    async def close(self) -> None:
        await self.runner.close()


def build_batches(
    settings: Settings,
    services: Services,
    router: Router,
    registry: CollectorRegistry,
    after_identify: Handler,
) -> Batches | None:
    """None when batches are off (``batches.enabled: false``): no routes, no worker."""
    if not settings.batches.enabled or services.database is None:
        return None
    files = build_file_store(settings.files, settings.data_dir, services.database)
    store = BatchStore(services.database)
    metrics = BatchMetrics(registry)
    runner = BatchRunner(
        settings.batches,
        store,
        files,
        after_identify,
        router,
        services.accounting,
        services.usage if settings.usage.enabled else None,
        services.keys,
        metrics,
        authenticated=services.identify is not None,
    )
    routes = [
        *FilesRoutes(files, services.identify).routes(),
        *BatchRoutes(
            store,
            files,
            router,
            settings.batches,
            metrics,
            services.identify,
            settings.server.max_body_bytes,
            runner.wake,
        ).routes(),
    ]
    return Batches(files, store, runner, routes)
