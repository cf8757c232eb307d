"""The Files and Batch APIs' settings (``files:`` and ``batches:`` in the configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilesSettings(_Strict):
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


class BatchSettings(_Strict):
    enabled: bool = Field(True, description="run batches (workers in every process)")
    concurrency: int = Field(4, ge=1, description="batch lines in flight per process")
    share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="most of a model's capacity (its deployments' concurrency caps) batch "
        "lines may hold at once in a process (at least one line)",
    )
    max_lines_per_second: float | None = Field(
        20.0,
        gt=0,
        description="most batch lines this process starts a second (null: no pace). "
        "Unpaced, a batch takes every spare cycle of the process and interactive "
        "requests wait behind its work (docs/benchmarks.md, Batches)",
    )
    lease_seconds: float = Field(
        900.0, ge=10, description="a claimed line's lease; a line not answered by then runs again"
    )
    poll_interval: float = Field(
        0.5, gt=0, description="seconds before looking again for lines when none was found"
    )
    max_poll_interval: float = Field(
        5.0, gt=0, description="the idle wait doubles up to this (a new batch here wakes it)"
    )
    housekeeping: float = Field(
        2.0, gt=0, description="seconds between lease, expiry and finalisation sweeps"
    )
    retry_after: float = Field(
        1.0, gt=0, description="seconds a worker waits after the gateway refused a line"
    )
    max_attempts: int = Field(
        3, ge=1, description="claims of a line whose worker died each time before it fails"
    )
    drain: float = Field(10.0, ge=0, description="seconds lines under way get at shutdown")
    max_lines: int = Field(50_000, ge=1, description="lines in one batch's input")
    max_open_per_key: int = Field(
        10, ge=1, description="batches of one key not yet finished; more are refused (429)"
    )
    max_line_bytes: int = Field(1024 * 1024, ge=1024, description="bytes in one input line")
