"""``sluice keys`` and ``sluice usage`` against the configured database."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import httpx
import pytest
import yaml

from sluice.keys.cli import create_key, list_keys, update_key
from sluice.settings import ConfigError, Settings
from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import MASTER, auth_config
from tests.gateway import running_gateway
from tests.test_cli import sluice


def test_keys_create_list_revoke_and_usage(upstream: MockUpstream, tmp_path: Path) -> None:
    config = auth_config(upstream.url, tmp_path)
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))

    created = sluice(
        "keys",
        "create",
        "--config",
        str(path),
        "--models",
        "gpt-4o-mini",
        "--rpm",
        "5",
        "--budget-usd",
        "2.5",
        "--budget-period",
        "monthly",
        "--meta",
        "team=search",
    )
    assert created.returncode == 0, created.stderr
    key_id = re.search(r"id:\s+(key_[0-9a-f]+)", created.stdout).group(1)  # type: ignore[union-attr]
    secret = re.search(r"key:\s+(sk-sluice-\S+)", created.stdout).group(1)  # type: ignore[union-attr]

    listed = sluice("keys", "list", "--config", str(path))
    assert key_id in listed.stdout
    assert "active" in listed.stdout
    assert secret not in listed.stdout
    assert secret[-4:] in listed.stdout  # shown as prefix + last four

    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    with running_gateway(config) as url:
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/chat/completions", json=body, headers=headers).status_code == 200
        revoked = sluice("keys", "revoke", "--config", str(path), key_id)
        assert revoked.returncode == 0
        # Without Redis, the running server's cache (TTL 0 in this config) reads the store again.
        response = httpx.post(f"{url}/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "key_revoked"

    usage = sluice("usage", "--config", str(path), "--key-id", key_id)
    assert usage.returncode == 0
    assert '"requests":1' in usage.stdout
    assert "revoked" in sluice("keys", "list", "--config", str(path), "--all").stdout
    missing = sluice("keys", "revoke", "--config", str(path), "key_000000000000")
    assert missing.returncode == 1
    assert "no API key" in missing.stderr


def test_cache_settings_from_the_command_line(tmp_path: Path) -> None:
    # What `sluice keys create/update` call, straight (the flags are parsed in sluice.cli).
    settings = Settings(data_dir=str(tmp_path))
    created = asyncio.run(
        create_key(
            settings,
            {
                "models": None,
                "meta": (),
                "team": "search",
                "cache_controls": False,
                "semantic_cache": "on",
            },
        )
    )
    key_id = re.search(r"id:\s+(key_[0-9a-f]+)", created).group(1)  # type: ignore[union-attr]
    listed = asyncio.run(list_keys(settings, False))
    row = next(line for line in listed.splitlines() if key_id in line)
    assert "search" in row
    assert row.endswith("semantic")  # no "controls": requests may not steer the cache

    updated = asyncio.run(
        update_key(
            settings, key_id, {"no_team": True, "cache_controls": True, "semantic_cache": "model"}
        )
    )
    assert updated == f"updated {key_id}: team=- cache_controls=on semantic_cache=model"
    row = next(
        line for line in asyncio.run(list_keys(settings, False)).splitlines() if key_id in line
    )
    assert row.endswith("  controls")

    for options, message in [
        ({"team": "a\nb"}, "team: Value error, a team name must be printable"),
        ({"team": "x" * 201}, "team: String should have at most 200 characters"),
        ({"semantic_cache": "maybe"}, "--semantic-cache must be one of on, off, model"),
        ({"team": "a", "no_team": True}, "cannot be given together"),
        ({}, "nothing to change"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            asyncio.run(update_key(settings, key_id, options))
    with pytest.raises(ConfigError, match="invalid key settings: team"):
        asyncio.run(create_key(settings, {"team": "\x1b[2J"}))
    with pytest.raises(LookupError, match="no API key"):
        asyncio.run(update_key(settings, "key_000000000000", {"team": "a"}))
