"""``/metrics`` on a port of its own (``server.metrics_port``), apart from the API.

prometheus_client's own exposition server, in a thread: the scrape never waits behind
API traffic, and the API port can face clients while the metrics port faces only the
monitoring network. Under several workers the supervisor runs it over the workers'
shared multiprocess directory.
"""

from __future__ import annotations

import os
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector


class MetricsListener:
    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        registry = self._registry
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory or registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        self._server, self._thread = start_http_server(self.port, self.host, registry)
        self.port = self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
