"""Running the app under uvicorn: one process, or a supervisor with N worker processes.

Shutdown: on SIGTERM the app's readiness turns false at once (see `app._drain_on_signals`),
uvicorn stops accepting, lets in-flight requests and streams finish for at most
``server.drain_timeout`` seconds, runs the lifespan's shutdown, and the process exits 0.

Reload: SIGHUP re-reads the configuration file's routing (`sluice.routing.reload`). With
several workers the supervisor passes it to every worker, each of which reloads on its
own (uvicorn's supervisor would otherwise restart them all).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from sluice.app import CONFIG_ENV, build_app
from sluice.http_protocol import ConnectionLimits, protocol_factory
from sluice.observability.listener import MetricsListener
from sluice.observability.logging import configure_logging
from sluice.routing.reload import ConfigSource
from sluice.settings import Settings, refuse_unshared_limits

log = logging.getLogger("sluice.server")
_SPARE_FILES = 1024
"""Descriptors beyond the connection cap: upstream pools, database, logs, the listener."""


def _uvicorn_options(settings: Settings) -> dict[str, object]:
    server = settings.server
    return {
        "host": server.host,
        "port": server.port,
        "loop": "uvloop",
        "http": protocol_factory(
            ConnectionLimits(
                header_timeout=server.header_timeout,
                body_timeout=server.body_timeout,
                max_connections=server.max_connections,
                write_timeout=server.write_timeout,
            )
        ),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        # Forwarded headers only from the proxies named: from anyone else they are a
        # client's claim, and the address keys the failed-authentication limit.
        "proxy_headers": bool(server.trusted_proxies),
        "forwarded_allow_ips": server.trusted_proxies or None,
        "log_config": None,
        "timeout_graceful_shutdown": server.drain_timeout,
        "timeout_keep_alive": server.keep_alive_timeout,
        "backlog": 4096,
    }


def serve(
    settings: Settings, config_path: str | None, overrides: Mapping[str, object] | None = None
) -> None:
    """Serve ``settings``, read from ``config_path`` (if any) with the command line's
    ``server`` ``overrides`` (a reload reads them the same way)."""
    refuse_unshared_limits(settings)  # (load_settings checks too: settings made otherwise)
    configure_logging(settings.logging.level)
    raise_open_files_limit(settings.server.max_connections + _SPARE_FILES)
    if settings.server.workers == 1:
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        app = build_app(settings, ConfigSource(config_path, given))
        server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(settings)))  # type: ignore[arg-type]
        # uvicorn re-raises the signal it caught once it has shut down gracefully; a no-op
        # handler turns that into a normal return, so a drained server exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        server.run()
        return
    _serve_workers(settings, config_path)


def _serve_workers(settings: Settings, config_path: str | None) -> None:
    """N worker processes on one socket; metrics aggregated through a shared directory."""
    metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if config_path is not None:
        # Absolute, not resolved: a Kubernetes ConfigMap's file is a symlink through
        # ``..data`` to a folder the kubelet replaces (and deletes) on every update.
        os.environ[CONFIG_ENV] = str(Path(config_path).absolute())
    # Command-line overrides reach the workers as environment overrides.
    os.environ["SLUICE_SERVER__HOST"] = settings.server.host
    os.environ["SLUICE_SERVER__PORT"] = str(settings.server.port)
    os.environ["SLUICE_SERVER__WORKERS"] = str(settings.server.workers)
    config = uvicorn.Config(
        "sluice.app:app_from_environment",
        factory=True,
        workers=settings.server.workers,
        **_uvicorn_options(settings),  # type: ignore[arg-type]
    )
    server = settings.server
    listener = None
    if server.metrics_port is not None:
        listener = MetricsListener(server.metrics_host or server.host, server.metrics_port)
        listener.start()
    try:
        _Supervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        if listener is not None:
            listener.close()


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, except that SIGHUP reaches every worker (each reloads its
    configuration, keeping its connections and health state) instead of restarting them."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: passing it to every worker (configuration reload)")
        for process in self.processes:
            # A worker still starting has no handler yet (SIGHUP would end it); it reads
            # the file as it starts.
            if process.pid is not None and process.is_ready(timeout=1):
                os.kill(process.pid, signal.SIGHUP)


def raise_open_files_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` descriptors (up to the hard limit): with the common
    soft limit of 1,024, accept() would fail long before ``server.max_connections``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning(
            "open files limited to %d: fewer than server.max_connections allows; "
            "raise the hard limit (ulimit -Hn) or lower server.max_connections",
            hard,
        )
