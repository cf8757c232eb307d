"""Reloading the routing through the real gateway: validated first, applied at once,
in-flight requests finishing on the table they started on, unchanged deployments kept."""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette

from sluice.app import build_app
from sluice.routing.deployment import Outcome
from sluice.routing.reload import ConfigSource
from sluice.settings import load_settings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import GatewayProcess, running_gateway, serving

MASTER = "sk-master-for-reload-tests"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def routing_config(upstream: MockUpstream, tmp_path: Path, a: float = 1, b: float = 0) -> dict:
    spec = {"provider": "openai", "api_base": upstream.url}
    return {
        "auth": {"master_key": "os.environ/SLUICE_TEST_MASTER_KEY"},
        "usage": {"enabled": False},
        "data_dir": str(tmp_path / "data"),
        # Retired deployments are closed soon after a reload (the retry deadline and the
        # queue wait bound when an old request may still start an attempt on one).
        "resilience": {"retries": {"deadline": 0.2}, "queue": {"max_wait": 0.1}},
        "models": [
            {"name": "gpt-a", "deployments": [{**spec, "model": "mock-a"}]},
            {"name": "gpt-b", "deployments": [{**spec, "model": "mock-b"}]},
        ],
        "aliases": [
            {
                "name": "gpt",
                "versions": [{"model": "gpt-a", "weight": a}, {"model": "gpt-b", "weight": b}],
            }
        ],
    }


class Reloadable:
    def __init__(self, app: Starlette, url: str, path: Path, client: httpx.Client) -> None:
        self.app = app
        self.url = url
        self.path = path
        self.client = client

    def write(self, config: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(config))

    def reload(self) -> httpx.Response:
        return httpx.post(f"{self.url}/admin/reload", headers=ADMIN, timeout=10)

    def chat(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, **CHAT, **extra}
        return self.client.post(f"{self.url}/v1/chat/completions", json=body)

    def served_by(self, model: str, n: int = 40) -> Counter[str]:
        return Counter(self.chat(model).json()["model"] for _ in range(n))

    def models(self) -> list[str]:
        listed = httpx.get(f"{self.url}/v1/models", headers=ADMIN).json()["data"]
        return [m["id"] for m in listed]

    @property
    def generation(self) -> int:
        return int(self.app.state.router.table.generation)


@contextmanager
def reloadable(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Reloadable]:
    monkeypatch.setenv("SLUICE_TEST_MASTER_KEY", MASTER)
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    app = build_app(load_settings(path), ConfigSource(str(path)))
    with (
        serving(app, timeout_graceful_shutdown=2) as port,
        httpx.Client(headers=ADMIN, timeout=10) as client,
    ):
        yield Reloadable(app, f"http://127.0.0.1:{port}", path, client)


def test_new_weights_from_the_file_make_a_new_split(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with reloadable(routing_config(upstream, tmp_path, 1, 0), tmp_path, monkeypatch) as gw:
        assert gw.served_by("gpt") == {"mock-a": 40}
        gw.write(routing_config(upstream, tmp_path, 0, 1))
        response = gw.reload()
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "applied",
            "generation": 2,
            "started": 0,
            "kept": 2,
            "retired": 0,
        }
        assert gw.served_by("gpt") == {"mock-b": 40}
        aliases = httpx.get(f"{gw.url}/admin/aliases", headers=ADMIN).json()
        assert aliases["generation"] == 2
        assert aliases["data"][0]["versions"] == [
            {"model": "gpt-a", "weight": 0.0},
            {"model": "gpt-b", "weight": 1.0},
        ]


def test_an_invalid_file_changes_nothing(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = routing_config(upstream, tmp_path)
    with reloadable(config, tmp_path, monkeypatch) as gw:
        table = gw.app.state.router.table
        broken = copy.deepcopy(config)
        broken["aliases"][0]["versions"][0]["model"] = "gpt-z"
        broken["models"].append(
            {"name": "gpt-new", "deployments": config["models"][0]["deployments"]}
        )
        gw.write(broken)
        response = gw.reload()
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_config"
        assert "unknown model 'gpt-z'" in error["message"]
        gw.path.write_text("models: [unclosed")
        assert gw.reload().json()["error"]["code"] == "invalid_config"
        # Nothing changed: the same table, the same names, still serving.
        assert gw.app.state.router.table is table
        assert "gpt-new" not in gw.models()
        assert gw.chat("gpt").status_code == 200
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'sluice_config_reloads_total{outcome="invalid"} 2.0' in metrics
        assert "sluice_config_generation 1.0" in metrics


def test_a_section_that_needs_a_restart_is_refused(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = routing_config(upstream, tmp_path)
    with reloadable(config, tmp_path, monkeypatch) as gw:
        gw.write({**config, "server": {"max_body_bytes": 2048}, "logging": {"level": "debug"}})
        response = gw.reload()
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "restart_needed"
        assert error["message"].startswith("restart needed: server, logging changed")
        assert gw.generation == 1


def test_unchanged_deployments_keep_their_backend_and_removed_ones_close(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = routing_config(upstream, tmp_path)
    with reloadable(config, tmp_path, monkeypatch) as gw:
        router = gw.app.state.router
        [kept] = router.deployments("gpt-a")
        [changed] = router.deployments("gpt-b")
        closed = threading.Event()
        close = changed.backend.close

        async def recorded_close() -> None:
            await close()
            closed.set()

        changed.backend.close = recorded_close
        changed.begin()  # an attempt still under way on it
        new = copy.deepcopy(config)
        new["models"][1]["deployments"][0]["timeout"] = {"total": 120}
        gw.write(new)
        assert gw.reload().json()["retired"] == 1
        assert router.deployments("gpt-a")[0] is kept
        assert router.deployments("gpt-b")[0] is not changed
        assert gw.chat("gpt-b").json()["model"] == "mock-b"
        assert not closed.wait(0.6)  # well past the earliest close: the attempt still runs
        changed.end(Outcome.OK, 0.01)
        assert closed.wait(5)


def test_an_in_flight_stream_finishes_on_the_old_table(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = routing_config(upstream, tmp_path)
    with reloadable(config, tmp_path, monkeypatch) as gw:
        lines: list[str] = []

        def consume() -> None:
            body = {
                "model": "gpt-b",
                **CHAT,
                "stream": True,
                "mock": {"tokens_per_second": 20, "completion_tokens": 12},
            }
            url = f"{gw.url}/v1/chat/completions"
            with httpx.stream("POST", url, json=body, headers=ADMIN, timeout=10) as r:
                lines.extend(line for line in r.iter_lines() if line)

        started = upstream.stats.streams_started
        thread = threading.Thread(target=consume)
        thread.start()
        deadline = time.monotonic() + 5
        while upstream.stats.streams_started == started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # gpt-b goes away (and the alias with it) while its stream runs.
        removed = copy.deepcopy(config)
        removed["models"] = removed["models"][:1]
        removed["aliases"] = []
        gw.write(removed)
        assert gw.reload().json()["retired"] == 1
        assert gw.chat("gpt-b").status_code == 404
        assert gw.models() == ["gpt-a"]
        thread.join(10)
    assert lines[-1] == "data: [DONE]"
    assert sum('"content":"tok' in line for line in lines) == 12


def test_weights_change_through_the_admin_api(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with reloadable(routing_config(upstream, tmp_path, 1, 0), tmp_path, monkeypatch) as gw:
        change = f"{gw.url}/admin/aliases/gpt"
        response = httpx.patch(change, json={"weights": {"gpt-b": 3}}, headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json()["versions"][1] == {"model": "gpt-b", "weight": 3.0}
        split = gw.served_by("gpt", 200)
        assert 120 <= split["mock-b"] <= 180
        assert gw.generation == 2
        refused = [
            ({"weights": {"gpt-c": 1}}, 400),
            ({"weights": {"gpt-a": 0, "gpt-b": 0}}, 400),
            ({"weights": {"gpt-a": -1}}, 400),
            ({"weights": {}}, 400),
        ]
        for body, status in refused:
            assert httpx.patch(change, json=body, headers=ADMIN).status_code == status, body
        missing = httpx.patch(f"{change}x", json={"weights": {"gpt-a": 1}}, headers=ADMIN)
        assert missing.status_code == 404
        assert httpx.patch(change, json={"weights": {"gpt-a": 1}}).status_code == 401
        assert gw.generation == 2
        # The file's weights come back with the next reload.
        gw.reload()
        assert gw.served_by("gpt") == {"mock-a": 40}


def test_without_a_file_there_is_nothing_to_reload(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_TEST_MASTER_KEY", MASTER)
    with running_gateway(routing_config(upstream, tmp_path)) as url:
        response = httpx.post(url.removesuffix("/v1") + "/admin/reload", headers=ADMIN)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_config_file"


def test_reloading_under_load_fails_no_request(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = routing_config(upstream, tmp_path, 1, 1)
    other = copy.deepcopy(config)
    for model in other["models"]:  # every deployment changes: each reload retires them all
        model["deployments"][0]["timeout"] = {"total": 90}
    with reloadable(config, tmp_path, monkeypatch) as gw:
        stop = threading.Event()
        statuses: Counter[int] = Counter()

        def load() -> None:
            with httpx.Client(headers=ADMIN, timeout=10) as client:
                while not stop.is_set():
                    stream = statuses.total() % 2 == 0
                    body = {"model": "gpt", **CHAT, "stream": stream}
                    response = client.post(f"{gw.url}/v1/chat/completions", json=body)
                    statuses[response.status_code] += 1

        clients = [threading.Thread(target=load) for _ in range(8)]
        for client in clients:
            client.start()
        for n in range(8):
            gw.write(other if n % 2 == 0 else config)
            assert gw.reload().status_code == 200
            time.sleep(0.15)
        stop.set()
        for client in clients:
            client.join(10)
        assert gw.generation == 9
    assert statuses.total() > 50
    assert statuses == {200: statuses.total()}


@pytest.mark.slow
def test_sighup_reloads_the_file(upstream: MockUpstream, tmp_path: Path) -> None:
    config = routing_config(upstream, tmp_path)
    del config["auth"]
    gateway = GatewayProcess(config, tmp_path).start(timeout=60)
    assert gateway.process is not None
    try:
        added = copy.deepcopy(config)
        added["models"].append({**config["models"][0], "name": "gpt-new"})
        gateway.config_path.write_text(yaml.safe_dump(added))
        gateway.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "gpt-new" not in httpx.get(f"{gateway.url}/v1/models").text:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)
        # An invalid file is refused and logged; the server goes on.
        gateway.config_path.write_text("models: 3")
        gateway.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reload refused" not in gateway.log():
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)
        assert "gpt-new" in httpx.get(f"{gateway.url}/v1/models").text
        assert gateway.terminate() == 0
    finally:
        gateway.stop()


@pytest.mark.slow
def test_sighup_reaches_every_worker(upstream: MockUpstream, tmp_path: Path) -> None:
    config = routing_config(upstream, tmp_path)
    del config["auth"]
    config["server"] = {"workers": 2}
    gateway = GatewayProcess(config, tmp_path).start(timeout=60)  # two spawned workers
    assert gateway.process is not None
    try:
        # A worker still starting reads the file as it starts; these have both started.
        deadline = time.monotonic() + 60
        while gateway.log().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)
        added = copy.deepcopy(config)
        added["models"].append({**config["models"][0], "name": "gpt-new"})
        gateway.config_path.write_text(yaml.safe_dump(added))
        gateway.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while gateway.log().count("configuration reloaded") < 2:
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)
        # Each request on a new connection, to whichever worker accepts it.
        for _ in range(20):
            with httpx.Client() as client:
                assert "gpt-new" in client.get(f"{gateway.url}/v1/models").text
        assert gateway.terminate() == 0
    finally:
        gateway.stop()


def test_a_watched_file_is_reloaded_when_it_changes(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``server.watch_config``: no signal, no admin call; the file's new split applies."""
    config = {**routing_config(upstream, tmp_path, 1, 0), "server": {"watch_config": 0.05}}
    with reloadable(config, tmp_path, monkeypatch) as gw:
        assert gw.served_by("gpt", 10) == {"mock-a": 10}
        gw.write({**routing_config(upstream, tmp_path, 0, 1), "server": {"watch_config": 0.05}})
        deadline = time.monotonic() + 5
        while gw.generation < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw.generation == 2
        assert gw.served_by("gpt", 10) == {"mock-b": 10}
        # An invalid file is refused (logged) and changes nothing.
        gw.path.write_text("models: {")
        time.sleep(0.3)
        assert gw.generation == 2
        assert gw.served_by("gpt", 10) == {"mock-b": 10}
