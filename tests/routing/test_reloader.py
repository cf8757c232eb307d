"""The reloader alone (no gateway): how reload requests that arrive together are served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from sluice.backends.registry import default_providers
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.reload import Reloader
from sluice.routing.router import Router
from sluice.routing.table import build_table
from sluice.settings import Settings, load_settings


class CountingSource:
    """A configuration file whose every read is counted."""

    supervised = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reads = 0

    def load(self) -> Settings:
        self.reads += 1
        return load_settings(self.path)


def _reloader(tmp_path: Path) -> tuple[Reloader, CountingSource]:
    config = {
        "models": [
            {
                "name": "m",
                "deployments": [{"provider": "openai", "api_base": "http://127.0.0.1:9/v1"}],
            }
        ]
    }
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    metrics = GatewayMetrics(CollectorRegistry())
    providers = default_providers(CollectorRegistry())
    router = Router(build_table(settings, providers, metrics=metrics).table)
    source = CountingSource(path)
    reloader = Reloader(settings, source, router, providers, metrics)  # type: ignore[arg-type]
    return reloader, source


async def test_a_storm_of_sighups_reloads_at_most_twice(tmp_path: Path) -> None:
    reloader, source = _reloader(tmp_path)
    for _ in range(50):
        reloader.signalled()
    # Let every signal's reload run to its end.
    for _ in range(200):
        await asyncio.sleep(0)
    await reloader.close()
    # One reload for the first signal; the rest arrived before it had read the file, so
    # one more reload (which reads the file as it is then) serves them all.
    assert 1 <= source.reads <= 2


async def test_a_sighup_after_a_reload_has_read_the_file_reloads_again(tmp_path: Path) -> None:
    reloader, source = _reloader(tmp_path)
    reloader.signalled()
    for _ in range(50):
        await asyncio.sleep(0)
    reloader.signalled()
    for _ in range(50):
        await asyncio.sleep(0)
    await reloader.close()
    assert source.reads == 2
