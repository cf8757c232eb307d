"""The health monitor: gauges copied from the live state, active probes fed to health
(`sluice.routing.monitor`), and the HTTP backend's probe itself."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from sluice.backends.base import Backend
from sluice.backends.openai_http import OpenAIHTTPBackend
from sluice.errors import UpstreamConnectError, UpstreamError
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.deployment import Deployment, Outcome
from sluice.routing.health import State
from sluice.routing.monitor import HealthMonitor
from sluice.routing.plan import ModelRoute
from sluice.routing.router import Router
from sluice.routing.table import Table
from sluice.settings import OpenAIDeployment
from sluice.testing.mock_upstream import MockBehaviour, MockUpstream
from tests.gateway import free_port
from tests.routing.fakes import FakeClock, deployments, health


class Tables:
    def __init__(self, table: dict[str, list[Deployment]]) -> None:
        self.table = table

    def model_deployments(self) -> list[tuple[str, Deployment]]:
        return [(model, d) for model, group in self.table.items() for d in group]


def sample(metrics: GatewayMetrics, name: str, deployment: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", "deployment": deployment})


def test_publish_copies_the_state_and_forgets_deployments_gone() -> None:
    clock = FakeClock()
    group = deployments(clock, count=2, consecutive_failures=1)
    group[0].begin()
    group[0].end(Outcome.FAILED, None)
    group[1].begin()
    group[1].end(Outcome.OK, 0.25)
    group[1].begin()
    group[1].end(Outcome.THROTTLED, None, 5.0)
    group[1].begin()  # under way
    metrics = GatewayMetrics(CollectorRegistry())
    table = {"m": group}
    monitor = HealthMonitor(Tables(table), metrics, clock=clock)
    monitor.publish()
    assert sample(metrics, "sluice_deployment_ejected", "d0") == 1
    assert sample(metrics, "sluice_deployment_ejected", "d1") == 0
    assert sample(metrics, "sluice_deployment_cooling", "d1") == 1
    assert sample(metrics, "sluice_deployment_outstanding", "d1") == 1
    assert sample(metrics, "sluice_deployment_ttfb_ewma_seconds", "d1") == 0.25
    assert sample(metrics, "sluice_deployment_ttfb_ewma_seconds", "d0") is None
    clock.advance(5)
    monitor.publish()
    assert sample(metrics, "sluice_deployment_cooling", "d1") == 0
    table.clear()  # the table was replaced by one without model m
    monitor.publish()
    assert sample(metrics, "sluice_deployment_outstanding", "d1") is None


class Probed:
    def __init__(self, answer: bool | Exception | None) -> None:
        self.answer = answer
        self.calls = 0

    async def probe(self) -> bool:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer is None:
            await asyncio.sleep(3600)
        return bool(self.answer)


async def test_probes_feed_health_and_time_out() -> None:
    clock = FakeClock()
    group = deployments(clock, count=4, consecutive_failures=1, max_ejected_percent=100)
    probes = [Probed(True), Probed(False), Probed(UpstreamConnectError("gone")), Probed(None)]
    for d, probe in zip(group, probes, strict=True):
        d.backend = cast(Backend, probe)
    metrics = GatewayMetrics(CollectorRegistry())
    await HealthMonitor(
        Router(Table({"m": ModelRoute("m", group)})), metrics, probe_interval=0.05
    ).probe()
    assert [p.calls for p in probes] == [1, 1, 1, 1]
    states = [health(d).state for d in group]
    # Three failed (a 5xx, a transport error, a timeout); three of four may be out.
    assert states == [State.CLOSED, State.EJECTED, State.EJECTED, State.EJECTED]


async def test_a_one_deployment_model_is_not_probed() -> None:
    clock = FakeClock()
    [only] = deployments(clock, count=1)
    only.health = None
    probe = Probed(False)
    only.backend = cast(Backend, probe)
    await HealthMonitor(
        Router(Table({"m": ModelRoute("m", [only])})), GatewayMetrics(CollectorRegistry())
    ).probe()
    assert probe.calls == 0


async def test_the_http_backend_probes_get_models() -> None:
    with MockUpstream() as up, MockUpstream(MockBehaviour(status=500)) as down:
        for upstream, healthy in ((up, True), (down, False)):
            backend = OpenAIHTTPBackend(
                "b", OpenAIDeployment(provider="openai", api_base=upstream.url), None
            )
            await backend.start()
            try:
                assert await backend.probe() is healthy
            finally:
                await backend.close()
            assert upstream.stats.by_route == {"models": 1}
    unreachable = OpenAIHTTPBackend(
        "b",
        OpenAIDeployment(provider="openai", api_base=f"http://127.0.0.1:{free_port()}/v1"),
        None,
    )
    await unreachable.start()
    try:
        with pytest.raises(UpstreamError):
            await unreachable.probe()
    finally:
        await unreachable.close()


def test_an_alias_publishes_nothing_of_its_own_and_stops_nothing() -> None:
    # An alias is a public name without deployments: the gauges are its models'.
    from sluice.routing.settings import AliasSettings, VersionSettings
    from sluice.routing.versions import Alias

    clock = FakeClock()
    group = deployments(clock, count=2)
    alias = Alias.of(AliasSettings(name="a", versions=[VersionSettings(model="m", weight=1)]))
    metrics = GatewayMetrics(CollectorRegistry())
    HealthMonitor(Router(Table({"m": ModelRoute("m", group)}, {"a": alias})), metrics).publish()
    published = {
        (s.labels["model"], s.labels["deployment"])
        for metric in metrics.deployment_outstanding.collect()
        for s in metric.samples
    }
    assert published == {("m", d.id) for d in group}


def test_a_deployments_cap_is_published_and_zero_without_one() -> None:
    clock = FakeClock()
    capped = deployments(clock, count=1, max_concurrency=8)
    uncapped = deployments(clock, count=1)
    metrics = GatewayMetrics(CollectorRegistry())
    table = {"m": capped}
    monitor = HealthMonitor(Tables(table), metrics, clock=clock)
    monitor.publish()
    assert sample(metrics, "sluice_deployment_max_concurrency", "d0") == 8
    table["m"] = uncapped  # a reload dropped the cap
    monitor.publish()
    assert sample(metrics, "sluice_deployment_max_concurrency", "d0") == 0
