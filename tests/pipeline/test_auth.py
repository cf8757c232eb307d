"""The authenticator's cache by credential header (`recognise`), against a fake key store."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sluice.errors import AuthenticationError
from sluice.pipeline import apikeys
from sluice.pipeline.auth import Authenticator
from sluice.store.keys import KeyRecord

MASTER = "sk-master-for-auth-tests-0123"


class FakeKeys:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.lookups = 0

    def add(self, **fields: object) -> tuple[str, KeyRecord]:
        new = apikeys.generate()
        record = KeyRecord(
            id=f"key_{len(self.records)}", key_hash=new.key_hash, display=new.display, **fields
        )  # type: ignore[arg-type]
        self.records[new.key_hash] = record
        return new.secret, record

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        return self.records.get(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"authorization", f"Bearer {secret}".encode())]


def setup() -> tuple[FakeKeys, Clock, Authenticator]:
    keys, clock = FakeKeys(), Clock()
    return keys, clock, Authenticator(keys, MASTER, cache_ttl=5.0, clock=clock)  # type: ignore[arg-type]


def test_a_key_is_recognised_from_its_header_within_the_ttl_only() -> None:
    keys, clock, auth = setup()
    secret, record = keys.add()
    assert auth.recognise(bearer(secret)) is None  # never authenticated yet
    principal = asyncio.run(auth.authenticate(bearer(secret)))
    assert principal.key is record
    assert auth.recognise(bearer(secret)) is principal
    clock.now += 5.0
    assert auth.recognise(bearer(secret)) is None  # the TTL has run out: back to the store
    asyncio.run(auth.authenticate(bearer(secret)))
    assert keys.lookups == 2
    assert auth.recognise(bearer(secret)) is not None


def test_the_same_key_in_another_header_form_is_not_taken_from_the_cache() -> None:
    keys, _, auth = setup()
    secret, _ = keys.add()
    asyncio.run(auth.authenticate(bearer(secret)))
    assert auth.recognise([(b"api-key", secret.encode())]) is None
    assert auth.recognise([(b"authorization", secret.encode())]) is None  # no Bearer scheme
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate([(b"authorization", secret.encode())]))
    # api-key is a credential header of its own: it is cached under its own name
    asyncio.run(auth.authenticate([(b"api-key", secret.encode())]))
    assert auth.recognise([(b"api-key", secret.encode())]) is not None


def test_revocation_and_expiry_are_seen_by_the_fast_path() -> None:
    keys, _, auth = setup()
    secret, record = keys.add()
    asyncio.run(auth.authenticate(bearer(secret)))
    # invalidation (what revoking does) empties the header cache at once
    revoked = replace(record, revoked_at=datetime.now(UTC))
    keys.records[record.key_hash] = revoked
    auth.invalidate(record.key_hash)
    assert auth.recognise(bearer(secret)) is None
    with pytest.raises(AuthenticationError, match="revoked"):
        asyncio.run(auth.authenticate(bearer(secret)))

    other, record2 = keys.add(expires_at=datetime.now(UTC) + timedelta(milliseconds=50))
    asyncio.run(auth.authenticate(bearer(other)))
    assert auth.recognise(bearer(other)) is not None
    expired_at = datetime.now(UTC) - timedelta(seconds=1)
    object.__setattr__(record2, "expires_at", expired_at)  # the cached record expires
    assert auth.recognise(bearer(other)) is None
    with pytest.raises(AuthenticationError, match="expired"):
        asyncio.run(auth.authenticate(bearer(other)))


def test_the_master_key_and_unknown_keys_never_enter_the_header_cache() -> None:
    _, _, auth = setup()
    assert asyncio.run(auth.authenticate(bearer(MASTER))).key is None
    assert auth.recognise(bearer(MASTER)) is None
    unknown = apikeys.generate().secret
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(bearer(unknown)))
    assert auth.recognise(bearer(unknown)) is None


class SlowKeys(FakeKeys):
    """A store whose reads answer what was stored when they began, once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.reading = asyncio.Event()

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        found = self.records.get(key_hash)
        self.reading.set()
        await self.release.wait()
        return found


async def test_concurrent_misses_of_one_key_share_one_store_read() -> None:
    keys = SlowKeys()
    auth = Authenticator(keys, MASTER, cache_ttl=5.0)  # type: ignore[arg-type]
    secret, record = keys.add()
    callers = [asyncio.create_task(auth.authenticate(bearer(secret))) for _ in range(32)]
    await asyncio.sleep(0)
    callers[0].cancel()  # a caller that leaves does not cancel the others' read
    keys.release.set()
    results = await asyncio.gather(*callers[1:])
    assert all(p.key is record for p in results)
    assert keys.lookups == 1
    assert auth.recognise(bearer(secret)) is not None


async def test_a_read_in_flight_when_the_key_is_invalidated_is_not_cached() -> None:
    keys = SlowKeys()
    auth = Authenticator(keys, MASTER, cache_ttl=5.0)  # type: ignore[arg-type]
    secret, record = keys.add()
    caller = asyncio.create_task(auth.authenticate(bearer(secret)))
    await keys.reading.wait()
    keys.records[record.key_hash] = replace(record, revoked_at=datetime.now(UTC))
    auth.invalidate(record.key_hash)  # the revocation lands while the read is in flight
    keys.release.set()
    assert (await caller).key is record  # that request began before the revocation
    with pytest.raises(AuthenticationError, match="revoked"):
        await auth.authenticate(bearer(secret))  # the next one reads the store again
    assert keys.lookups == 2
