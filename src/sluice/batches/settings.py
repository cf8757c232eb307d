"""The Files API's settings (``files:`` in the configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class FilesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: Literal["disk", "database"] = Field(
        "disk",
        description="where file contents are kept: a local directory (default), or the "
        "database (for replicas that share no disk)",
    )
    directory: str | None = Field(
        None,
        description="the directory of the disk storage; default: <data_dir>/files. Replicas "
        "sharing a database must share this directory too, or use storage: database",
    )
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=1, description="the largest file a client may upload, in bytes"
    )

    def directory_path(self, data_dir: str | Path) -> Path:
        """The disk storage's directory: ``directory``, or ``files`` under ``data_dir``."""
        if self.directory is not None:
            return Path(self.directory).expanduser()
        return Path(data_dir).expanduser() / "files"
