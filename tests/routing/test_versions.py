"""Versions of an alias: the canary split, sticky users, and how few move when weights change."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from sluice.backends.registry import default_providers
from sluice.observability.metrics import GatewayMetrics
from sluice.pipeline.context import RequestContext
from sluice.pipeline.costs import price_table
from sluice.pipeline.plan import MakePlan, sticky_key
from sluice.routing.router import Router
from sluice.routing.settings import AliasSettings, StickySettings
from sluice.routing.table import build_table
from sluice.routing.versions import MAX_STICKY_KEY, Alias
from sluice.settings import Settings

USERS = [f"user-{n}" for n in range(10_000)]


def canary(a: float = 90, b: float = 10) -> Alias:
    return Alias("gpt", (("gpt-a", a), ("gpt-b", b)))


def test_a_90_10_split_lands_within_one_and_a_half_points() -> None:
    alias, rng = canary(), random.Random(7)
    counts = Counter(alias.choose(rng) for _ in range(10_000))
    assert abs(counts["gpt-b"] / 10_000 - 0.10) <= 0.015


def test_sticky_users_split_by_weight_too() -> None:
    counts = Counter(canary().choose(random.Random(), user) for user in USERS)
    assert abs(counts["gpt-b"] / len(USERS) - 0.10) <= 0.015


def test_a_sticky_user_never_switches_while_the_weights_stand() -> None:
    alias = canary()
    first = {user: alias.choose(random.Random(), user) for user in USERS}
    # Other draws, another process's rng, and the same alias rebuilt (as a reload does).
    rebuilt = Alias.of(
        AliasSettings(
            name="gpt",
            versions=[{"model": "gpt-a", "weight": 90}, {"model": "gpt-b", "weight": 10}],
            sticky=StickySettings(by="user"),
        )
    )
    for _ in range(3):
        for user in USERS[:2000]:
            assert alias.choose(random.Random(), user) == first[user]
            assert rebuilt.choose(random.Random(), user) == first[user]


def test_the_choice_depends_on_names_only() -> None:
    """Every process and replica maps a user alike: the hash is keyed by names, not by
    Python's per-process string hash (these values must never change)."""
    alias = Alias("gpt", (("gpt-a", 1), ("gpt-b", 1)))
    a, b = "gpt-a", "gpt-b"
    assert [alias.rendezvous(f"u{n}") for n in range(8)] == [a, a, a, a, b, b, b, a]


def test_going_from_90_10_to_80_20_moves_about_a_tenth_of_users_one_way() -> None:
    before = {user: canary(90, 10).rendezvous(user) for user in USERS}
    after = {user: canary(80, 20).rendezvous(user) for user in USERS}
    moved = [user for user in USERS if before[user] != after[user]]
    assert 0.085 <= len(moved) / len(USERS) <= 0.115
    # Only the users the new weights need: all from a to b, none back.
    assert all(before[u] == "gpt-a" and after[u] == "gpt-b" for u in moved)


def test_a_third_version_takes_its_share_from_the_others_only() -> None:
    two = Alias("gpt", (("a", 50), ("b", 50), ("c", 0)))
    three = Alias("gpt", (("a", 50), ("b", 50), ("c", 20)))
    moved = [u for u in USERS if two.rendezvous(u) != three.rendezvous(u)]
    assert all(three.rendezvous(u) == "c" for u in moved)
    assert abs(len(moved) / len(USERS) - 20 / 120) <= 0.015
    assert "c" not in {two.choose(random.Random(n)) for n in range(2000)}


def test_weights_change_only_within_the_alias_versions() -> None:
    alias = canary()
    assert alias.reweighted({"gpt-b": 50}).weights == {"gpt-a": 90, "gpt-b": 50}
    with pytest.raises(ValueError, match="no version 'gpt-c'"):
        alias.reweighted({"gpt-c": 1})
    with pytest.raises(ValueError, match="at least one version"):
        alias.reweighted({"gpt-a": 0, "gpt-b": 0})
    with pytest.raises(ValueError, match="finite"):
        alias.reweighted({"gpt-a": float("inf")})
    with pytest.raises(ValueError, match="finite"):
        alias.reweighted({"gpt-a": -1})


def test_weights_whose_total_overflows_are_refused() -> None:
    # Each weight is finite, but their sum is not: the draw would pick past the last version.
    huge = 1.5e308
    with pytest.raises(ValueError, match="finite"):
        canary().reweighted({"gpt-a": huge, "gpt-b": huge})
    with pytest.raises(ValueError, match="finite"):
        AliasSettings(
            name="gpt",
            versions=[{"model": "gpt-a", "weight": huge}, {"model": "gpt-b", "weight": huge}],
        )


def _settings(**extra: object) -> Settings:
    spec = {"provider": "openai", "api_base": "http://127.0.0.1:9/v1"}
    config: dict[str, object] = {
        "models": [
            {
                "name": "gpt-a",
                "deployments": [spec],
                "pricing": {"prompt_per_million": 1, "completion_per_million": 4},
            },
            {
                "name": "gpt-b",
                "deployments": [spec],
                "pricing": {"prompt_per_million": 2, "completion_per_million": 3},
            },
        ],
        "aliases": [
            {
                "name": "gpt",
                "versions": [{"model": "gpt-a", "weight": 90}, {"model": "gpt-b", "weight": 10}],
            }
        ],
    }
    return Settings(**{**config, **extra})


def test_the_router_serves_aliases_beside_models() -> None:
    router = Router(build_table(_settings(), default_providers(CollectorRegistry())).table, seed=1)
    assert router.model_names == ["gpt-a", "gpt-b", "gpt"]
    assert router.knows("gpt")
    assert not router.knows("gpt-c")
    plans = [router.plan("gpt") for _ in range(1000)]
    assert {p.model for p in plans} == {"gpt-a", "gpt-b"}
    assert all(p.candidates == router.deployments(p.model) for p in plans)
    assert router.plan("gpt-b").model == "gpt-b"
    with pytest.raises(KeyError):
        router.plan("gpt-c")


async def test_the_plan_step_counts_the_version_chosen() -> None:
    registry = CollectorRegistry()
    router = Router(build_table(_settings(), default_providers(registry)).table, seed=3)
    step = MakePlan(router, GatewayMetrics(registry))

    async def answer(ctx: RequestContext) -> None:
        return None

    step.next = answer  # type: ignore[assignment]
    for _ in range(200):
        await step(RequestContext("r", 0.0, model="gpt"))
    chosen = {
        version: registry.get_sample_value(
            "sluice_alias_choices_total", {"alias": "gpt", "version": version}
        )
        for version in ("gpt-a", "gpt-b")
    }
    assert chosen["gpt-a"] is not None
    assert chosen["gpt-b"] is not None
    assert chosen["gpt-a"] + chosen["gpt-b"] == 200


def test_the_sticky_key_comes_from_the_user_or_a_header() -> None:
    by_user = StickySettings(by="user")
    by_header = StickySettings(by="header", header="X-Session-ID")
    ctx = RequestContext("r", 0.0, body={"user": "alice"}, headers=[(b"x-session-id", b"s1")])
    assert sticky_key(by_user, ctx) == "alice"
    assert sticky_key(by_header, ctx) == "s1"
    assert sticky_key(by_user, RequestContext("r", 0.0, body={"user": 42})) is None
    assert sticky_key(by_user, RequestContext("r", 0.0, body={"user": ""})) is None
    assert sticky_key(by_header, RequestContext("r", 0.0)) is None
    long = RequestContext("r", 0.0, body={"user": "x" * 1_000_000})
    assert len(sticky_key(by_user, long) or "") == MAX_STICKY_KEY
    with pytest.raises(ValueError, match="not an HTTP header name"):
        StickySettings(by="header", header="x session")


def test_an_alias_is_held_at_its_dearest_version_price() -> None:
    settings = _settings()
    prices = price_table(settings.models, settings.aliases)
    assert prices["gpt"] == (2, 4)  # each rate the highest of its versions'
    assert prices["gpt-a"] == (1, 4)


def test_versions_are_checked_when_the_settings_load() -> None:
    alias = {"name": "gpt", "versions": [{"model": "gpt-a", "weight": 1}]}
    with pytest.raises(ValueError, match="listed twice"):
        _settings(aliases=[{**alias, "versions": alias["versions"] * 2}])  # type: ignore[operator]
    with pytest.raises(ValueError, match="finite"):
        _settings(aliases=[{**alias, "versions": [{"model": "gpt-a", "weight": "inf"}]}])
    with pytest.raises(ValueError, match="unknown model 'gpt-c'"):
        _settings(aliases=[{**alias, "versions": [{"model": "gpt-c", "weight": 1}]}])
    with pytest.raises(ValueError, match="defined twice"):
        _settings(aliases=[{**alias, "name": "gpt-a"}])


def test_a_rebuilt_table_keeps_unchanged_deployments() -> None:
    providers = default_providers(CollectorRegistry())
    first = build_table(_settings(), providers)
    old = first.table
    changed = _settings().model_dump()
    changed["models"][1]["deployments"][0]["timeout"]["total"] = 30.0
    changed["models"].append({**changed["models"][0], "name": "gpt-c"})
    rebuilt = build_table(Settings(**changed), providers, old)
    assert rebuilt.table.generation == 2
    assert rebuilt.table.routes["gpt-a"].deployments[0] is old.routes["gpt-a"].deployments[0]
    assert rebuilt.table.routes["gpt-b"].deployments[0] is not old.routes["gpt-b"].deployments[0]
    assert rebuilt.fresh == [
        rebuilt.table.routes["gpt-b"].deployments[0],
        rebuilt.table.routes["gpt-c"].deployments[0],
    ]
    assert rebuilt.retired == [old.routes["gpt-b"].deployments[0]]
