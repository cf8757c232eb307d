"""The process's serving state, read by /readyz and the request middleware.

    STARTING ──lifespan done──▶ READY ──SIGTERM──▶ DRAINING ──drained──▶ STOPPING

While DRAINING, /readyz answers 503 so load balancers stop sending traffic, but requests
that still arrive are served, through ``server.drain_delay`` and after it, while uvicorn
closes the listening socket and the idle connections and waits for the requests under
way. STOPPING begins with the lifespan's shutdown, once uvicorn is done: the middleware
then refuses (503) any request that slips in, as the services it would need are closing.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING

    def ready(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def drain(self) -> None:
        if self.phase is not Phase.STOPPING:
            self.phase = Phase.DRAINING

    def stop(self) -> None:
        self.phase = Phase.STOPPING

    @property
    def accepting(self) -> bool:
        return self.phase is not Phase.STOPPING

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY
