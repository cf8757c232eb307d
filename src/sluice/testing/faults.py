"""Random faults for the mock upstream: what a failing provider does, drawn per request.

A `MockFaults` is set when the mock starts (constructor, ``sluice mock-upstream`` flags) and
changed while it runs (``POST /mock/faults``). Each API request draws one value from the
instance's generator to pick at most one fault before its first byte, from disjoint shares:

    [0, error_rate)                        an error status (``error_status``)
    [.., + reset_rate)                     a TCP reset, no response
    [.., + throttle_rate)                  a 429 with ``Retry-After`` (``retry_after`` s)
    [.., + stall_rate)                     silence for ``stall_seconds``, then the answer
    the rest                               no fault

so "30% errors and another 5% stalls" is ``error_rate=0.3, stall_rate=0.05``. A second
value decides whether a stream that began goes silent after its first event
(``stream_stall_rate`` for ``stream_stall_seconds``, then goes on). ``added_latency_ms``
(plus up to ``latency_jitter_ms``, drawn) delays every answer; ``down`` resets every
request, as a deployment that died. With a ``seed`` the draws repeat from run to run for
requests that arrive in the same order; setting a seed at run time restarts the sequence.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["Draw", "Fault", "FaultInjector", "MockFaults"]

Rate = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
Seconds = Field(10.0, ge=0.0, le=3600.0, allow_inf_nan=False)


class MockFaults(BaseModel):
    """The faults in force; every rate is a share of requests (0 to 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    error_rate: float = Rate
    error_status: int = Field(500, ge=400, le=599)
    reset_rate: float = Rate
    throttle_rate: float = Rate
    retry_after: float = Field(1.0, ge=0.0, le=3600.0, allow_inf_nan=False)
    """Seconds a 429 asks the client to wait (``retry-after-ms``; ``retry-after`` rounded up)."""
    stall_rate: float = Rate
    stall_seconds: float = Seconds
    """Silence before the first byte; the answer follows unless the client left."""
    stream_stall_rate: float = Rate
    stream_stall_seconds: float = Seconds
    """Silence after a stream's first event; the rest follows unless the client left."""
    added_latency_ms: float = Field(0.0, ge=0.0, le=3_600_000.0, allow_inf_nan=False)
    latency_jitter_ms: float = Field(0.0, ge=0.0, le=3_600_000.0, allow_inf_nan=False)
    down: bool = False
    """Reset every request at once, as a deployment that died."""
    seed: int | None = None

    @model_validator(mode="after")
    def _shares_fit(self) -> MockFaults:
        if self.error_rate + self.reset_rate + self.throttle_rate + self.stall_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + reset_rate + throttle_rate + stall_rate exceeds 1")
        return self

    def injects_any(self) -> bool:
        """Whether any fault can happen."""
        return self.model_dump(exclude={"seed"}) != _NONE


_NONE = MockFaults().model_dump(exclude={"seed"})


class Fault(enum.Enum):
    """The fault a request meets before its first byte."""

    NONE = "none"
    ERROR = "error"
    RESET = "reset"
    THROTTLE = "throttle"
    STALL = "stall"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Draw:
    """What one request meets: a fault before the first byte, and the extra waits."""

    fault: Fault
    latency_s: float = 0.0
    """Added before anything is sent."""
    stall_s: float = 0.0
    """Silence before the first byte (`Fault.STALL`)."""
    stream_stall_s: float = 0.0
    """Silence after a stream's first event (0: none)."""


NO_FAULT = Draw(Fault.NONE)


class FaultInjector:
    """The faults in force and the generator they are drawn from.

    Used on the mock's event loop; `set` may be called from another thread (it replaces
    the settings and the generator, each in one assignment)."""

    def __init__(self, faults: MockFaults | None = None) -> None:
        self.faults = faults if faults is not None else MockFaults()
        self._any = self.faults.injects_any()
        self._rng = random.Random(self.faults.seed)

    def set(self, faults: MockFaults, reseed: bool = True) -> None:
        """Put ``faults`` in force; with ``reseed``, their seed (if any) restarts the draws."""
        if reseed and faults.seed is not None:
            self._rng = random.Random(faults.seed)
        self._any = faults.injects_any()
        self.faults = faults

    def update(self, changes: Any) -> MockFaults:
        """Apply ``changes`` (a JSON object of `MockFaults` fields) over the faults in force;
        the draws restart only when ``changes`` names a seed.

        Raises ValueError, with a readable message, when they are not valid."""
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object of fault settings")
        try:
            faults = MockFaults.model_validate({**self.faults.model_dump(), **changes})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'faults'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(problems) from None
        self.set(faults, reseed="seed" in changes)
        return faults

    def draw(self) -> Draw:
        """The faults of the next request."""
        f = self.faults
        if f.down:
            return Draw(Fault.DOWN)
        if not self._any:  # the default: a mock without faults draws nothing
            return NO_FAULT
        rng = self._rng
        first, second = rng.random(), rng.random()
        latency = f.added_latency_ms
        if f.latency_jitter_ms:
            latency += rng.random() * f.latency_jitter_ms
        fault = Fault.NONE
        for candidate, share in (
            (Fault.ERROR, f.error_rate),
            (Fault.RESET, f.reset_rate),
            (Fault.THROTTLE, f.throttle_rate),
            (Fault.STALL, f.stall_rate),
        ):
            if first < share:
                fault = candidate
                break
            first -= share
        stream_stall = f.stream_stall_seconds if second < f.stream_stall_rate else 0.0
        return Draw(
            fault,
            latency_s=latency / 1000,
            stall_s=f.stall_seconds if fault is Fault.STALL else 0.0,
            stream_stall_s=stream_stall,
        )


def retry_after_headers(seconds: float) -> dict[str, str]:
    """A 429's wait as OpenAI writes it: whole seconds, and milliseconds beside them."""
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(round(seconds * 1000))}
