"""The Files and Batch APIs' settings (``files:`` and ``batches:`` in the configuration)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    lease_seconds: float = Field(
        900.0, ge=10, description="a claimed line's lease; a line not answered by then runs again"
    )
    poll_interval: float = Field(0.5, gt=0, description="seconds between claims when idle")
    housekeeping: float = Field(
        2.0, gt=0, description="seconds between lease, expiry and finalisation sweeps"
    )
    retry_after: float = Field(
        1.0, gt=0, description="seconds a worker waits after the gateway refused a line"
    )
    drain: float = Field(10.0, ge=0, description="seconds lines under way get at shutdown")
    max_lines: int = Field(50_000, ge=1, description="lines in one batch's input")
    max_line_bytes: int = Field(1024 * 1024, ge=1024, description="bytes in one input line")
