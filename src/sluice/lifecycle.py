"""The process's serving state, read by /readyz and the request middleware."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


class Lifecycle:
    """Starting until the lifespan has built every service; draining from SIGTERM on."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING

    def ready(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def drain(self) -> None:
        self.phase = Phase.DRAINING

    @property
    def accepting(self) -> bool:
        return self.phase is not Phase.DRAINING

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY
