"""The admin API for routing at run time, guarded by the master key like the rest of /admin:

    GET    /admin/aliases          the aliases, their versions' weights, the table's generation
    PATCH  /admin/aliases/{name}   change version weights (until the next reload)
    POST   /admin/reload           re-read the configuration file (`sluice.routing.reload`)

With several workers a reload is validated by the worker that answers, then passed to
every worker through the supervisor (SIGHUP); a weight change, which would reach one
worker only, is refused (409) in favour of a reload.
"""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from sluice.api.admin import master_only
from sluice.pipeline.auth_failures import AddressLockout
from sluice.routing.reload import Reloader
from sluice.routing.router import Router
from sluice.routing.versions import Alias


class VersionView(BaseModel):
    model: str
    weight: float


class AliasView(BaseModel):
    name: str
    versions: list[VersionView]
    sticky: dict[str, str | None] | None
    shadow: dict[str, str | float] | None

    @classmethod
    def of(cls, alias: Alias) -> AliasView:
        return cls(
            name=alias.name,
            versions=[VersionView(model=m, weight=w) for m, w in alias.versions],
            sticky=alias.sticky.model_dump() if alias.sticky is not None else None,
            shadow=alias.shadow.model_dump() if alias.shadow is not None else None,
        )


class AliasList(BaseModel):
    data: list[AliasView]
    generation: int = Field(description="the model table in use: 1 at start-up, +1 per change")


class WeightsChange(BaseModel):
    weights: dict[str, float] = Field(
        min_length=1,
        description="new weights by version model; versions not named keep theirs",
        json_schema_extra={"examples": [{"gpt-4o-2024-08-06": 80, "gpt-4o-2024-11-20": 20}]},
    )

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(w) and w >= 0 for w in weights.values()):
            raise ValueError("weights must be finite numbers >= 0")
        return weights


class ReloadResult(BaseModel):
    status: Literal["applied", "signalled"] = Field(
        description="applied here, or (several workers) validated and passed to every worker"
    )
    generation: int | None = None
    started: int | None = Field(None, description="deployments with a new backend")
    kept: int | None = Field(None, description="deployments that kept backend, pool and health")
    retired: int | None = Field(None, description="deployments closed once their requests end")


def routing_admin_router(
    router: Router,
    reloader: Reloader,
    master_key: str | None,
    lockout: AddressLockout | None = None,
) -> APIRouter:
    api = APIRouter(
        prefix="/admin", tags=["routing"], dependencies=master_only(master_key, lockout)
    )

    @api.get("/aliases", response_model=AliasList)
    async def list_aliases() -> AliasList:
        table = router.table
        return AliasList(
            data=[AliasView.of(a) for a in table.aliases.values()], generation=table.generation
        )

    @api.patch("/aliases/{name}", response_model=AliasView)
    async def change_weights(name: str, change: WeightsChange) -> AliasView:
        return AliasView.of(reloader.set_weights(name, change.weights))

    @api.post("/reload", response_model=ReloadResult)
    async def reload() -> ReloadResult:
        if reloader.source.supervised:
            reloader.check()
            reloader.signal_all()
            return ReloadResult(status="signalled")
        report = await reloader.reload()
        return ReloadResult(
            status="applied",
            generation=report.generation,
            started=report.started,
            kept=report.kept,
            retired=report.retired,
        )

    return api
