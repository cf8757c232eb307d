from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sluice.keys.format import display, hash_key, new_key_id
from sluice.keys.store import KeyConflictError, KeyRecord, KeyStore
from sluice.store.database import Database

NOW = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)


def make_key(secret: str = "sk-sluice-abcdefghijklmnop", **fields: object) -> KeyRecord:
    values: dict[str, object] = {
        "id": new_key_id(),
        "key_hash": hash_key(secret),
        "display": display(secret),
        "created_at": NOW,
    }
    values.update(fields)
    return KeyRecord(**values)  # type: ignore[arg-type]


def test_active_means_not_revoked_and_not_expired() -> None:
    assert make_key().active(NOW)
    expiring = make_key(expires_at=NOW + timedelta(hours=1))
    assert expiring.active(NOW)
    assert not expiring.active(NOW + timedelta(hours=1))
    assert not make_key(revoked_at=NOW - timedelta(seconds=1)).active(NOW)


def test_record_refuses_naive_datetimes_and_bad_periods() -> None:
    with pytest.raises(ValueError, match="naive"):
        make_key(expires_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="budget period"):
        make_key(budget_period="yearly")


async def test_create_and_get_round_trip_every_field(db: Database) -> None:
    store = KeyStore(db)
    key = make_key(
        models=["gpt-4o-mini", "smollm2"],
        model_limits={"gpt-4o-mini": {"rpm": 10, "tpm": 1000}},
        rpm=60,
        tpm=10_000,
        max_parallel=4,
        budget_usd=12.5,
        budget_period="monthly",
        expires_at=NOW + timedelta(days=30),
        metadata={"team": "search", "tags": ["a", "b"]},
        team="search",
        cache_controls=False,
        semantic_cache=True,
    )
    await store.create(key)

    got = await store.get(key.id, now=NOW)
    assert got is not None
    # A periodic budget starts its period when the key is created.
    assert got == KeyRecord(
        **{**key.__dict__, "period_started_at": datetime(2025, 3, 1, tzinfo=UTC)}
    )
    assert got.created_at.tzinfo is UTC
    assert got.expires_at is not None
    assert got.expires_at.tzinfo is UTC
    assert await store.get_by_hash(key.key_hash, now=NOW) == got
    assert await store.get("key_missing") is None
    assert await store.get_by_hash(hash_key("nope")) is None


async def test_defaults_are_null_models_and_empty_metadata(db: Database) -> None:
    store = KeyStore(db)
    key = make_key()
    await store.create(key)
    got = await store.get(key.id)
    assert got is not None
    assert got.models is None
    assert got.model_limits is None
    assert got.metadata == {}
    assert got.spend_usd == 0.0
    assert got.budget_period is None
    assert got.period_started_at is None
    assert got.team is None
    assert got.cache_controls is True
    assert got.semantic_cache is None


async def test_duplicate_id_or_hash_is_a_conflict(db: Database) -> None:
    store = KeyStore(db)
    key = make_key()
    await store.create(key)
    with pytest.raises(KeyConflictError):
        await store.create(make_key(id=key.id, key_hash=hash_key("other")))
    with pytest.raises(KeyConflictError):
        await store.create(make_key())  # same secret, new id


async def test_list_hides_revoked_unless_asked(db: Database) -> None:
    store = KeyStore(db)
    first = make_key("sk-first-000000000000", created_at=NOW)
    second = make_key("sk-second-11111111111", created_at=NOW + timedelta(seconds=1))
    third = make_key("sk-third-222222222222", created_at=NOW + timedelta(seconds=2))
    for key in (third, first, second):
        await store.create(key)
    assert await store.revoke(second.id, now=NOW + timedelta(minutes=1))

    assert [k.id for k in await store.list()] == [first.id, third.id]
    everything = await store.list(include_revoked=True)
    assert [k.id for k in everything] == [first.id, second.id, third.id]
    assert everything[1].revoked_at == NOW + timedelta(minutes=1)
    assert not everything[1].active(NOW + timedelta(minutes=2))


async def test_revoke_is_false_for_unknown_or_already_revoked(db: Database) -> None:
    store = KeyStore(db)
    key = make_key()
    await store.create(key)
    assert await store.revoke(key.id)
    assert not await store.revoke(key.id)
    assert not await store.revoke("key_000000000000")
    got = await store.get_by_hash(key.key_hash)
    assert got is not None
    assert not got.active()


async def test_expired_key_is_not_active(db: Database) -> None:
    store = KeyStore(db)
    key = make_key(expires_at=NOW + timedelta(minutes=5))
    await store.create(key)
    got = await store.get(key.id)
    assert got is not None
    assert got.active(NOW)
    assert not got.active(NOW + timedelta(minutes=5))


async def test_update_changes_only_mutable_fields(db: Database) -> None:
    store = KeyStore(db)
    key = make_key(rpm=10, models=["a"], metadata={"owner": "x"})
    await store.create(key)

    updated = await store.update(
        key.id,
        now=NOW,
        models=None,
        model_limits={"a": {"rpm": 1}},
        rpm=20,
        tpm=None,
        max_parallel=2,
        budget_usd=3.0,
        expires_at=NOW + timedelta(days=1),
        metadata={"owner": "y"},
    )
    assert updated is not None
    assert (updated.models, updated.rpm, updated.max_parallel) == (None, 20, 2)
    assert updated.model_limits == {"a": {"rpm": 1}}
    assert updated.budget_usd == 3.0
    assert updated.expires_at == NOW + timedelta(days=1)
    assert updated.metadata == {"owner": "y"}
    assert (updated.id, updated.key_hash, updated.created_at) == (
        key.id,
        key.key_hash,
        key.created_at,
    )
    assert await store.get(key.id, now=NOW) == updated

    with pytest.raises(ValueError, match="cannot update"):
        await store.update(key.id, key_hash="x")
    with pytest.raises(ValueError, match="budget period"):
        await store.update(key.id, budget_period="hourly")
    assert await store.update("key_missing", rpm=1) is None


async def test_changing_the_budget_period_starts_a_new_period(db: Database) -> None:
    store = KeyStore(db)
    key = make_key(budget_usd=10.0)
    await store.create(key)
    updated = await store.update(key.id, now=NOW, budget_period="weekly")
    assert updated is not None
    assert updated.budget_period == "weekly"
    assert updated.period_started_at == datetime(2025, 3, 3, tzinfo=UTC)
    lifetime = await store.update(key.id, now=NOW, budget_period=None)
    assert lifetime is not None
    assert lifetime.period_started_at is None


async def test_cache_settings_change_and_come_back_as_booleans(db: Database) -> None:
    store = KeyStore(db)
    key = make_key()
    await store.create(key)

    updated = await store.update(
        key.id, team="Équipe données 7", cache_controls=False, semantic_cache=False
    )
    assert updated is not None
    # `is`, not ==: SQLite's RETURNING and plain reads must both give real booleans.
    assert (updated.team, updated.cache_controls, updated.semantic_cache) == (
        "Équipe données 7",
        False,
        False,
    )
    assert updated.cache_controls is False
    assert updated.semantic_cache is False
    assert await store.get(key.id) == updated

    back = await store.update(key.id, team=None, cache_controls=True, semantic_cache=None)
    assert back is not None
    assert (back.team, back.cache_controls, back.semantic_cache) == (None, True, None)
    assert back.cache_controls is True
    assert await store.get_by_hash(key.key_hash) == back
    assert [k.cache_controls for k in await store.list()] == [True]
