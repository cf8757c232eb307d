"""``server.watch_config``: a changed configuration file is reloaded, as with SIGHUP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sluice.routing.watch import ConfigWatcher


async def test_a_change_of_content_is_seen_once_and_no_change_never(tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("models: []\n")
    calls: list[int] = []
    watcher = ConfigWatcher(str(config), 0.02, lambda: calls.append(1))
    watcher.start()
    try:
        await asyncio.sleep(0.1)
        assert calls == []
        os.utime(config)  # touched, same bytes: not a change
        await asyncio.sleep(0.1)
        assert calls == []
        config.write_text("models: [x]\n")
        await asyncio.sleep(0.1)
        assert calls == [1]
    finally:
        await watcher.close()


async def test_a_configmap_style_symlink_swap_is_a_change(tmp_path: Path) -> None:
    """The kubelet writes a new folder and moves the ``..data`` link to it; the file the
    process opened is a link through ``..data``."""
    first, second = tmp_path / "..2026_a", tmp_path / "..2026_b"
    first.mkdir()
    second.mkdir()
    (first / "sluice.yaml").write_text("one\n")
    (second / "sluice.yaml").write_text("two\n")
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/sluice.yaml", tmp_path / "sluice.yaml")
    calls: list[int] = []
    watcher = ConfigWatcher(str(tmp_path / "sluice.yaml"), 0.02, lambda: calls.append(1))
    watcher.start()
    try:
        os.symlink(second.name, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await asyncio.sleep(0.1)
        assert calls == [1]
    finally:
        await watcher.close()


async def test_a_file_missing_for_a_moment_is_not_a_change(tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("same\n")
    calls: list[int] = []
    watcher = ConfigWatcher(str(config), 0.02, lambda: calls.append(1))
    watcher.start()
    try:
        config.unlink()
        await asyncio.sleep(0.1)
        config.write_text("same\n")
        await asyncio.sleep(0.1)
        assert calls == []
    finally:
        await watcher.close()


def test_every_worker_sees_a_configmap_update(tmp_path: Path) -> None:
    """``--workers 2`` on a ConfigMap-style mount: the workers must watch the link the
    operator named, not the folder it pointed to at start-up (the kubelet deletes it)."""
    import shutil
    import time

    import httpx
    import yaml

    from tests.gateway import GatewayProcess

    def version(folder: Path, model: str) -> None:
        folder.mkdir()
        config = {
            "data_dir": str(tmp_path / "data"),
            "server": {"workers": 2, "watch_config": 0.1},
            "models": [
                {
                    "name": model,
                    "deployments": [{"provider": "openai", "api_base": "http://127.0.0.1:9/v1"}],
                }
            ],
        }
        (folder / "sluice.yaml").write_text(yaml.safe_dump(config))

    mount = tmp_path / "mount"
    mount.mkdir()
    version(mount / "..v1", "first")
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/sluice.yaml", mount / "sluice.yaml")
    gateway = GatewayProcess({}, tmp_path)
    gateway.config_path = mount / "sluice.yaml"
    gateway.start(timeout=30)
    try:
        version(mount / "..v2", "second")
        os.symlink("..v2", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(mount / "..v1")  # as the kubelet does
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while time.monotonic() < deadline:
            # New connections spread over both workers: sample enough of them.
            seen = {
                httpx.get(f"{gateway.url}/v1/models", headers={"connection": "close"}).json()[
                    "data"
                ][0]["id"]
                for _ in range(20)
            }
            if seen == {"second"}:
                break
            time.sleep(0.2)
        assert seen == {"second"}
    finally:
        # SIGTERM, so the supervisor stops its workers (stop()'s SIGKILL would orphan them).
        if gateway.process is not None:
            gateway.process.terminate()
            gateway.process.wait(20)
        gateway.stop()


async def test_a_file_that_cannot_be_read_is_said_once_and_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("same\n")
    calls: list[int] = []
    watcher = ConfigWatcher(str(config), 0.02, lambda: calls.append(1))
    watcher.start()
    try:
        config.unlink()
        os.mkfifo(config)  # a read would block for ever
        await asyncio.sleep(0.15)
        assert calls == []
        warnings = [r for r in caplog.records if "cannot be read" in r.getMessage()]
        assert len(warnings) == 1
        assert "not a regular file" in warnings[0].getMessage()
        config.unlink()
        config.write_text("changed\n")
        await asyncio.sleep(0.1)
        assert calls == [1]
    finally:
        await watcher.close()
