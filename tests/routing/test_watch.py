"""``server.watch_config``: a changed configuration file is reloaded, as with SIGHUP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

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
