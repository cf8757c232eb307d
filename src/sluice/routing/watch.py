"""Reload the configuration when its file changes (``server.watch_config``).

For files that change under the process, not by an operator who could send SIGHUP: a
Kubernetes ConfigMap mounted as a directory is swapped in by the kubelet (a symlink moved
to a new folder) a minute or so after the ConfigMap changes. The file's bytes are compared,
not its mtime, because that swap can leave the resolved path's mtime older than before.
A change is applied as a SIGHUP's would be (`Reloader.signalled`): validated first, refused
with a logged error if invalid or if it touches a section that needs a restart. Every
worker of a multi-process server watches on its own and reloads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sluice.reload")


class ConfigWatcher:
    """Calls ``on_change`` when the bytes of ``path`` differ from the last look."""

    def __init__(self, path: str, interval: float, on_change: Callable[[], None]) -> None:
        self._path = Path(path)
        self._interval = interval
        self._on_change = on_change
        self._seen = self._digest()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            digest = await asyncio.to_thread(self._digest)
            if digest is None or digest == self._seen:
                continue  # a file briefly missing mid-swap is not a change
            self._seen = digest
            log.info("configuration file changed: reloading", extra={"path": str(self._path)})
            self._on_change()

    def _digest(self) -> bytes | None:
        try:
            return hashlib.blake2b(self._path.read_bytes(), digest_size=16).digest()
        except OSError:
            return None
