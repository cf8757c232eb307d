"""The background side of health: gauges published from the live state, and active probes.

Balancing and health keep their state in plain fields that the request path updates; the
monitor copies it into the per-deployment gauges once a second, so no request pays for a
metric (and the gauges work in multiprocess mode, where a scrape reads files, not objects).
When ``probe_interval`` is set it also sends ``GET /models`` to every deployment whose
backend can be probed, in models with more than one deployment, and feeds the answers to
outlier detection: a dead upstream is found before a client's request is sent to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Protocol

from sluice.errors import UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.deployment import Deployment
from sluice.routing.health import Clock, DeploymentHealth, State

log = logging.getLogger("sluice.routing")

PUBLISH_INTERVAL = 1.0
"""Seconds between two copies of the state into the gauges."""
PROBE_TIMEOUT = 10.0
"""Seconds a probe may take when no interval bounds it (a probe never outlasts the
interval, so rounds never overlap)."""


class Table(Protocol):
    """What the monitor reads of the router: the current table, whatever replaced it."""

    def model_deployments(self) -> list[tuple[str, Deployment]]: ...


class HealthMonitor:
    def __init__(
        self,
        router: Table,
        metrics: GatewayMetrics,
        probe_interval: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._probe_interval = probe_interval
        self._clock = clock
        self._published: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._publishing()))
        if self._probe_interval is not None:
            self._tasks.append(asyncio.create_task(self._probing(self._probe_interval)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def publish(self) -> None:
        """Copy every deployment's state into its gauges; drop those of deployments gone
        from the table (a reload)."""
        metrics = self._metrics
        now = self._clock()
        seen = set()
        for model, deployment in self._router.model_deployments():
            labels = (model, deployment.id)
            seen.add(labels)
            health = deployment.health
            ejected = health is not None and health.state is not State.CLOSED
            cooling = health is not None and now < health.cooled_until
            metrics.deployment_ejected.labels(*labels).set(ejected)
            metrics.deployment_cooling.labels(*labels).set(cooling)
            metrics.deployment_outstanding.labels(*labels).set(deployment.outstanding)
            # 0 for no cap, not a removed series: with --workers N a removed child's last
            # value stays in the shared files (prometheus_client cannot remove it there).
            cap = deployment.max_concurrency or 0
            metrics.deployment_max_concurrency.labels(*labels).set(cap)
            latency = health.latency(now) if health is not None else None
            if latency is not None:
                metrics.deployment_ttfb.labels(*labels).set(latency)
        for labels in self._published - seen:
            for gauge in (
                metrics.deployment_ejected,
                metrics.deployment_cooling,
                metrics.deployment_outstanding,
                metrics.deployment_max_concurrency,
                metrics.deployment_ttfb,
            ):
                with suppress(KeyError):
                    gauge.remove(*labels)
        self._published = seen

    async def probe(self) -> None:
        """One round of active probes, all deployments at once."""
        timeout = self._probe_interval or PROBE_TIMEOUT
        rounds = []
        for _, deployment in self._router.model_deployments():
            probe: Callable[[], Awaitable[bool]] | None = getattr(deployment.backend, "probe", None)
            if deployment.health is not None and probe is not None:
                rounds.append(self._probe_one(deployment.id, deployment.health, probe, timeout))
        await asyncio.gather(*rounds)

    async def _probe_one(
        self,
        name: str,
        health: DeploymentHealth,
        probe: Callable[[], Awaitable[bool]],
        seconds: float,
    ) -> None:
        try:
            async with asyncio.timeout(seconds):
                ok = await probe()
        except (UpstreamError, TimeoutError) as exc:
            log.info("active probe of deployment %s failed: %s", name, exc)
            ok = False
        health.probed(ok)

    async def _publishing(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # a bug here must not freeze the gauges for good
                log.exception("health monitor: publishing the gauges failed")
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def _probing(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.probe()
            except Exception:
                log.exception("health monitor: a round of active probes failed")
