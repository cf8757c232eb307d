"""The router: plans requests for public names on the current model table.

The table (`sluice.routing.table.Table`) is replaced whole, in one assignment, by a reload
or a change of an alias's weights (`swap`); a request reads it once when it is planned and
keeps the deployments of its plan to the end, so it finishes on the table it started on.
"""

from __future__ import annotations

import random

from sluice.backends.base import Backend
from sluice.routing.deployment import Deployment
from sluice.routing.plan import Plan
from sluice.routing.settings import ShadowSettings, StickySettings
from sluice.routing.table import Table
from sluice.routing.versions import Alias


class Router:
    """Plans requests for public model names and aliases."""

    def __init__(self, table: Table, seed: int | None = None):
        self.table = table
        self._rng = random.Random(seed)

    @property
    def model_names(self) -> list[str]:
        """Every public name, models then aliases (the same list until the table changes)."""
        return self.table.names

    def knows(self, model: str) -> bool:
        return model in self.table.served

    def sticky(self, model: str) -> StickySettings | None:
        """How ``model``'s requests stay on one version: None unless a sticky alias."""
        alias = self.table.aliases.get(model)
        return alias.sticky if alias is not None else None

    def shadow(self, model: str) -> ShadowSettings | None:
        alias = self.table.aliases.get(model)
        return alias.shadow if alias is not None else None

    def plan(self, model: str, sticky_key: str | None = None) -> Plan:
        """The candidates for ``model``; for an alias, those of the version chosen
        (``Plan.model`` names it). KeyError when the table does not serve ``model`` (a
        reload may have removed it since the request was read)."""
        table = self.table
        route = table.routes.get(model)
        if route is None:
            route = table.routes[table.aliases[model].choose(self._rng, sticky_key)]
        return route.plan(self._rng)

    def alias(self, name: str) -> Alias | None:
        return self.table.aliases.get(name)

    def deployments(self, model: str) -> list[Deployment]:
        return self.table.routes[model].deployments

    def model_deployments(self) -> list[tuple[str, Deployment]]:
        """Every (model, deployment) of the current table (an alias has none of its own)."""
        return [(name, d) for name, route in self.table.routes.items() for d in route.deployments]

    def backends(self) -> list[Backend]:
        return [d.backend for d in self.table.deployments()]

    def swap(self, table: Table) -> Table:
        """Serve from ``table`` from now on; returns the one it replaces."""
        previous, self.table = self.table, table
        return previous
