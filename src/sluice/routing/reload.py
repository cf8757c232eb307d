"""Changing the routing at run time: a configuration reload, or an alias's weights.

A reload (SIGHUP, or ``POST /admin/reload``) re-reads the file the server was started
with and:

1. validates the whole file first: an invalid one changes nothing (the admin API answers
   400 with the problems; a signal logs them);
2. refuses a change outside the reloadable sections (``models`` and ``aliases``, and any
   section an applier is registered for), naming the sections that need a restart;
3. builds the new table, keeping every unchanged deployment (its backend, pool and
   health) and starting the backends of new or changed ones before anything is switched;
4. switches in one event-loop turn: the router's table, then the hooks (the shadow
   step's link, the price table) and the appliers, with no await in between;
5. closes the deployments nothing uses any more once no request planned on the old
   table can still start an attempt on them (the retry deadline and the queue wait have
   passed) and the attempts on them have ended (``outstanding`` is zero), or after the
   longest request timeout at the latest.

Requests planned on the old table keep its deployments, so they finish where they started.
Changed weights (`Reloader.set_weights`) swap the table the same way and last until the
next reload, which takes the file's weights again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.backends.registry import ProviderRegistry
from sluice.errors import ConflictError, InvalidRequestError, NotFoundError
from sluice.observability.metrics import GatewayMetrics
from sluice.routing.capacity import LoadShedding
from sluice.routing.deployment import Deployment
from sluice.routing.router import Router
from sluice.routing.table import Table, build_table
from sluice.routing.versions import Alias
from sluice.settings import ConfigError, OpenAIDeployment, Settings, load_settings

log = logging.getLogger("sluice.reload")

RELOADABLE = frozenset({"models", "aliases"})
"""Sections a reload applies by itself; others need an applier (`Reloader`) or a restart."""
RETIRE_GRACE = 600.0
"""Seconds a retired deployment without a request timeout (an embedded model) is given."""
_RETIRE_POLL = 0.05


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the running settings came from, to read them again."""

    path: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """``server`` values from the command line, applied over the file's as at start-up."""
    supervised: bool = False
    """A worker of the multi-process server (`sluice.server`): a reload reaches every
    worker through the supervisor's SIGHUP, and weights cannot change in one alone."""

    def load(self) -> Settings:
        if self.path is None:
            raise ConflictError(
                "The server was started without a configuration file: there is nothing to reload.",
                code="no_config_file",
            )
        try:
            return load_settings(self.path, **self.overrides)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), code="invalid_config") from None


@dataclass(frozen=True, slots=True)
class ReloadReport:
    generation: int
    started: int
    """Deployments with a new backend."""
    kept: int
    """Deployments that kept their backend, pool and health."""
    retired: int
    """Deployments closed once their requests end."""


class Reloader:
    def __init__(
        self,
        settings: Settings,
        source: ConfigSource,
        router: Router,
        providers: ProviderRegistry,
        metrics: GatewayMetrics,
        *,
        on_swap: Sequence[Callable[[Table], None]] = (),
        on_reload: Sequence[Callable[[Settings], None]] = (),
        appliers: Mapping[str, Callable[[Settings], None]] | None = None,
        shedding: LoadShedding | None = None,
    ) -> None:
        """``on_swap`` hooks see every table swapped in (a reload's or a weight
        change's), ``on_reload`` hooks every reload's settings (the price table);
        ``appliers`` make more sections reloadable (``{"resilience": apply}``): each is
        called with the new settings when its section changed. All run in the turn of the
        swap."""
        self.settings = settings
        self.source = source
        self._router = router
        self._providers = providers
        self._metrics = metrics
        self._shedding = shedding
        self._on_swap = list(on_swap)
        self._on_reload = list(on_reload)
        self._appliers = dict(appliers or {})
        self._lock = asyncio.Lock()
        self._signal_waiting = False
        """A SIGHUP's reload is waiting for the lock (it has not read the file yet)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: list[Deployment] = []

    @property
    def reloadable(self) -> frozenset[str]:
        return RELOADABLE | frozenset(self._appliers)

    def check(self) -> Settings:
        """The file's settings, valid and changing only reloadable sections; raises the
        400 (invalid, or a restart needed) or the 409 (no file)."""
        try:
            settings = self.source.load()
        except InvalidRequestError:
            self._metrics.reloads.labels("invalid").inc()
            raise
        fixed = [
            name
            for name in type(settings).model_fields
            if name not in self.reloadable
            and getattr(settings, name) != getattr(self.settings, name)
        ]
        if fixed:
            self._metrics.reloads.labels("restart_needed").inc()
            raise InvalidRequestError(
                f"restart needed: {', '.join(fixed)} changed, and only "
                f"{', '.join(sorted(self.reloadable))} can be reloaded. Nothing was changed.",
                code="restart_needed",
            )
        return settings

    async def reload(self) -> ReloadReport:
        """Apply the configuration file's routing now (see the module's doc)."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> ReloadReport:
        """`reload`, the lock held."""
        settings = self.check()
        previous = self._router.table
        try:
            built = build_table(
                settings, self._providers, previous, self._metrics, shedding=self._shedding
            )
        except ConfigError as exc:  # a secret that cannot be read, a missing extra
            self._metrics.reloads.labels("invalid").inc()
            raise InvalidRequestError(str(exc), code="invalid_config") from None
        started = await asyncio.gather(
            *(d.backend.start() for d in built.fresh), return_exceptions=True
        )
        failure = next((r for r in started if isinstance(r, BaseException)), None)
        if failure is not None:
            await _close(built.fresh)
            self._metrics.reloads.labels("failed").inc()
            raise InvalidRequestError(
                f"a new deployment did not start ({failure}); nothing was changed.",
                code="reload_failed",
            )
        # The switch: one event-loop turn, nothing awaited.
        self._install(built.table)
        for hook in self._on_reload:
            hook(settings)
        for section, apply in self._appliers.items():
            if getattr(settings, section) != getattr(self.settings, section):
                apply(settings)
        self.settings = settings
        self._metrics.reloads.labels("ok").inc()
        if built.retired:
            self._retire(built.retired, *_grace(previous, built.retired, settings))
        report = ReloadReport(
            built.table.generation,
            started=len(built.fresh),
            kept=len(built.table.deployments()) - len(built.fresh),
            retired=len(built.retired),
        )
        log.info("configuration reloaded", extra=dataclasses.asdict(report))
        return report

    def signal_all(self) -> None:
        """A worker of a multi-process server: after `check`, ask the supervisor to pass
        SIGHUP to every worker (this one included), each of which reloads."""
        os.kill(os.getppid(), signal.SIGHUP)

    def signalled(self) -> None:
        """SIGHUP: reload in the background; the outcome is logged. Signals that arrive
        while a reload waits to read the file are served by that reload (it reads the file
        as it is then), so a storm of them costs at most one reload more than the one
        running, not one each."""
        if self._signal_waiting:
            return
        self._signal_waiting = True
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            async with self._lock:
                self._signal_waiting = False  # a signal from now on needs another read
                await self._reload()
        except (InvalidRequestError, ConflictError) as exc:
            log.error("configuration reload refused: %s", exc.message, extra={"code": exc.code})
        except Exception:
            self._metrics.reloads.labels("failed").inc()
            log.exception("configuration reload failed")

    def set_weights(self, name: str, weights: Mapping[str, float]) -> Alias:
        """Change some of an alias's version weights until the next reload."""
        if self.source.supervised:
            raise ConflictError(
                "With several workers a weight change would reach only the worker that "
                "answers: change the weights in the configuration file and reload it "
                "(POST /admin/reload or SIGHUP).",
                code="workers_need_reload",
            )
        alias = self._router.alias(name)
        if alias is None:
            raise NotFoundError(f"No alias named '{name[:200]}'.", code="alias_not_found")
        try:
            changed = alias.reweighted(weights)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="weights") from None
        self._install(self._router.table.with_alias(changed))
        log.info("alias weights changed", extra={"alias": name, "weights": changed.weights})
        return changed

    def _install(self, table: Table) -> None:
        self._router.swap(table)
        for hook in self._on_swap:
            hook(table)
        self._metrics.config_generation.set(table.generation)

    def _retire(self, deployments: list[Deployment], earliest: float, grace: float) -> None:
        self._retiring += deployments
        closing = self._close_when_idle(deployments, earliest, grace)
        task = asyncio.get_running_loop().create_task(closing)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_when_idle(
        self, deployments: list[Deployment], earliest: float, grace: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await asyncio.sleep(earliest)
        # Attempts count themselves on their deployment (begin/end); a rare event, so a
        # short poll rather than a wake-up wired into every attempt's end.
        while any(d.outstanding > 0 for d in deployments) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_RETIRE_POLL)
        self._retiring = [d for d in self._retiring if d not in deployments]
        await _close(deployments)

    async def close(self) -> None:
        """At shutdown (no request runs any more): stop waiting, close what was retired."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        retiring, self._retiring = self._retiring, []
        await _close(retiring)


def _grace(previous: Table, retired: list[Deployment], settings: Settings) -> tuple[float, float]:
    """How long to keep retired deployments open: at least until no request planned
    before the swap can start an attempt on them (it may wait in a queue, then retry until
    its deadline), at most as long as such a request may run (the longest timeout among
    them, and the time a slow client may take to read the end)."""
    resilience = settings.resilience
    earliest = resilience.retries.deadline + resilience.queue.max_wait
    specs = {id(deployment): spec for spec, deployment in previous.specs.values()}
    longest = 0.0
    for deployment in retired:
        spec = specs.get(id(deployment))
        total = spec.timeout.total if isinstance(spec, OpenAIDeployment) else RETIRE_GRACE
        longest = max(longest, total)
    return earliest, max(earliest, longest + settings.server.write_timeout)


async def _close(deployments: list[Deployment]) -> None:
    results = await asyncio.gather(
        *(d.backend.close() for d in deployments), return_exceptions=True
    )
    for deployment, result in zip(deployments, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("closing retired deployment %s failed: %r", deployment.id, result)
