"""Settings: YAML, environment overrides, secret references, and every shipped example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sluice.settings import (
    DEFAULT_LOCAL_MODEL,
    ConfigError,
    LocalDeployment,
    OpenAIDeployment,
    load_settings,
    resolve_secret,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {
    "server": {"host": "127.0.0.1", "port": 8080, "max_body_bytes": 4194304},
    "models": [
        {
            "name": "gpt-4o-mini",
            "deployments": [
                {
                    "provider": "openai",
                    "api_base": "http://127.0.0.1:9100/v1/",
                    "api_key": "os.environ/UPSTREAM_KEY",
                    "model": "gpt-4o-mini",
                    "weight": 1,
                    "timeout": {"connect": 2, "first_byte": 30, "total": 600},
                    "max_concurrency": 256,
                }
            ],
        }
    ],
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_issue_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE))
    deployment = settings.models[0].deployments[0]
    assert isinstance(deployment, OpenAIDeployment)
    assert deployment.api_base == "http://127.0.0.1:9100/v1"
    assert deployment.timeout.first_byte == 30
    assert deployment.max_concurrency == 256


def test_no_file_means_the_embedded_model() -> None:
    settings = load_settings(None)
    assert [m.name for m in settings.models] == [DEFAULT_LOCAL_MODEL]
    assert isinstance(settings.models[0].deployments[0], LocalDeployment)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SERVER__PORT", "9999")
    monkeypatch.setenv("SLUICE_LOGGING__ACCESS_LOG", "false")
    settings = load_settings(write(tmp_path, EXAMPLE))
    assert settings.server.port == 9999
    assert settings.logging.access_log is False
    assert settings.server.host == "127.0.0.1"


def test_command_line_overrides_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_SERVER__PORT", "9999")
    settings = load_settings(write(tmp_path, EXAMPLE), port=7000, host=None)
    assert settings.server.port == 7000


def test_inline_secrets_are_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(yaml.safe_dump(EXAMPLE))
    data["models"][0]["deployments"][0]["api_key"] = "sk-live-123"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, data))
    assert "api_key" in str(caught.value)
    assert "inline secrets are not allowed" in str(caught.value)
    assert "sk-live-123" not in str(caught.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["models"][0]["deployments"][0].pop("api_base"), "api_base"),
        (lambda d: d["models"][0]["deployments"][0].update(weight=0), "weight"),
        (lambda d: d["models"][0]["deployments"][0].update(provider="nope"), "provider"),
        (lambda d: d["server"].update(prot=1), "prot"),
        (lambda d: d["models"].append(d["models"][0]), "defined twice"),
    ],
)
def test_bad_files_say_where(tmp_path: Path, mutate: object, expected: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(EXAMPLE))
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, data))


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "abc")
    assert resolve_secret("os.environ/MY_KEY") == "abc"
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    assert resolve_secret(f"file:{secret}") == "from-file"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ConfigError, match="MY_KEY"):
        resolve_secret("os.environ/MY_KEY")


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *ROOT.glob("examples/*.yaml"),
            *ROOT.glob("bench/sluice*.yaml"),
            *ROOT.glob("deploy/**/sluice*.yaml"),
        ]
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_shipped_config_loads(path: Path) -> None:
    assert load_settings(path).models


def test_trusted_proxies_are_normalised_to_networks() -> None:
    from sluice.settings import ServerSettings

    server = ServerSettings(trusted_proxies=["127.0.0.1/8", "10.1.2.3", " ::1 "])
    assert server.trusted_proxies == ["127.0.0.0/8", "10.1.2.3/32", "::1/128"]
    with pytest.raises(ValueError, match="not an IP address"):
        ServerSettings(trusted_proxies=["nginx"])


def test_a_local_step_budget_fits_between_parallel_and_batch_size() -> None:
    from sluice.settings import LocalDeployment

    assert LocalDeployment(provider="local", parallel=4, step_tokens=16).step_tokens == 16
    for bad in (4, 513):
        with pytest.raises(ValueError, match="step_tokens"):
            LocalDeployment(provider="local", parallel=4, step_tokens=bad)
