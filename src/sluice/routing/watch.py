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
from stat import S_ISREG

log = logging.getLogger("sluice.reload")
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A configuration file past this is not read (nor reloaded): a mistake, not a config."""


class ConfigWatcher:
    """Calls ``on_change`` when the bytes of ``path`` differ from the last look."""

    def __init__(self, path: str, interval: float, on_change: Callable[[], None]) -> None:
        self._path = Path(path)
        self._interval = interval
        self._on_change = on_change
        self._unreadable: str | None = None  # why the last look failed, logged once
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
        """The file's hash; None (and one warning until it reads again) when it cannot
        be read: missing, not a regular file (a FIFO would block the read), too large."""
        try:
            stat = self._path.stat()
            if not S_ISREG(stat.st_mode):
                raise OSError("not a regular file")
            if stat.st_size > MAX_CONFIG_BYTES:
                raise OSError(f"larger than {MAX_CONFIG_BYTES} bytes")
            digest = hashlib.blake2b(self._path.read_bytes(), digest_size=16).digest()
        except OSError as exc:
            reason = str(exc)
            if reason != self._unreadable:
                log.warning(
                    "the configuration file cannot be read; changes are not reloaded "
                    "until it can: %s",
                    reason,
                    extra={"path": str(self._path)},
                )
            self._unreadable = reason
            return None
        self._unreadable = None
        return digest
