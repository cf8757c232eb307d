"""The authenticator's caches (by credential header, by key, of unknown keys) and its lockout
of client addresses that fail, against a fake key store."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sluice.errors import AuthenticationError, RateLimitError
from sluice.keys import format as key_format
from sluice.keys.store import KeyRecord
from sluice.pipeline import auth as auth_module
from sluice.pipeline.auth import Authenticator
from sluice.pipeline.auth_failures import AddressLockout, UnknownKeys

MASTER = "sk-master-for-auth-tests-0123"


class FakeKeys:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.lookups = 0

    def add(self, **fields: object) -> tuple[str, KeyRecord]:
        new = key_format.generate()
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
    unknown = key_format.generate().secret
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


def api_key(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"api-key", secret.encode())]


def test_a_full_key_cache_forgets_its_oldest_key_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "_MAX_CACHED", 100)
    keys, _, auth = setup()
    secrets = [keys.add()[0] for _ in range(101)]
    for secret in secrets:
        asyncio.run(auth.authenticate(bearer(secret)))
    assert keys.lookups == 101
    # Another header form misses the header cache and goes to the key cache: only the
    # first key, the oldest, was dropped to make room for the 101st.
    for secret in secrets[1:]:
        asyncio.run(auth.authenticate(api_key(secret)))
    assert keys.lookups == 101
    asyncio.run(auth.authenticate(api_key(secrets[0])))
    assert keys.lookups == 102


def test_a_full_header_cache_drops_expired_entries_before_live_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth_module, "_MAX_CACHED", 100)
    keys, clock, auth = setup()
    for _ in range(60):
        asyncio.run(auth.authenticate(bearer(keys.add()[0])))
    clock.now += 10  # those 60 have expired
    live, _ = keys.add()
    asyncio.run(auth.authenticate(bearer(live)))
    for _ in range(60):
        asyncio.run(auth.authenticate(bearer(keys.add()[0])))
    assert auth.recognise(bearer(live)) is not None


def test_an_unknown_key_is_remembered_apart_longer_than_valid_keys() -> None:
    keys, clock = FakeKeys(), Clock()
    auth = Authenticator(
        keys,  # type: ignore[arg-type]
        MASTER,
        cache_ttl=5.0,
        clock=clock,
        unknown_keys=UnknownKeys(capacity=100, ttl=60.0, clock=clock),
    )
    unknown = key_format.generate().secret
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="Incorrect API key"):
            asyncio.run(auth.authenticate(bearer(unknown)))
        clock.now += 10  # past the valid keys' TTL, within the unknown keys'
    assert keys.lookups == 1
    clock.now += 60
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(bearer(unknown)))
    assert keys.lookups == 2


def test_unknown_keys_are_bounded_and_forget_the_oldest_and_the_expired() -> None:
    clock = Clock()
    unknown = UnknownKeys(capacity=100, ttl=60.0, clock=clock)
    for n in range(1000):
        unknown.add(f"h{n}")
    assert len(unknown) == 100
    assert "h999" in unknown
    assert "h899" not in unknown
    clock.now += 30
    unknown.add("late")
    clock.now += 31  # the first 100 have expired, "late" has not
    unknown.add("later")
    assert len(unknown) == 2
    assert "late" in unknown
    assert "h999" not in unknown
    off = UnknownKeys(capacity=0, ttl=60.0, clock=clock)
    off.add("h")
    assert "h" not in off


async def test_concurrent_misses_of_one_unknown_key_share_one_store_read() -> None:
    keys = SlowKeys()
    auth = Authenticator(
        keys,  # type: ignore[arg-type]
        MASTER,
        unknown_keys=UnknownKeys(capacity=100, ttl=60.0),
        lockout=AddressLockout(limit=1000, window=10.0, capacity=100),
    )
    unknown = key_format.generate().secret
    callers = [
        asyncio.create_task(auth.authenticate(bearer(unknown), client="192.0.2.1"))
        for _ in range(32)
    ]
    await asyncio.sleep(0)
    keys.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert keys.lookups == 1


def locked_setup(limit: int = 3) -> tuple[FakeKeys, Clock, Authenticator]:
    keys, clock = FakeKeys(), Clock()
    auth = Authenticator(
        keys,  # type: ignore[arg-type]
        MASTER,
        cache_ttl=5.0,
        clock=clock,
        unknown_keys=UnknownKeys(capacity=100, ttl=60.0, clock=clock),
        lockout=AddressLockout(limit=limit, window=10.0, capacity=100, clock=clock),
    )
    return keys, clock, auth


def fail(auth: Authenticator, client: str | None, secret: str | None = None) -> Exception:
    """The error of one attempt with ``secret`` (a fresh unknown key by default)."""
    try:
        asyncio.run(auth.authenticate(bearer(secret or key_format.generate().secret), b"", client))
    except (AuthenticationError, RateLimitError) as exc:
        return exc
    raise AssertionError("authenticated")


def test_an_address_that_fails_too_often_gets_429_without_a_lookup() -> None:
    keys, clock, auth = locked_setup(limit=3)
    for _ in range(3):
        assert isinstance(fail(auth, "192.0.2.1"), AuthenticationError)
    assert keys.lookups == 3
    clock.now += 4
    refused = fail(auth, "192.0.2.1")
    assert isinstance(refused, RateLimitError)
    assert refused.status == 429
    assert refused.code == "too_many_auth_failures"
    assert refused.headers["Retry-After"] == "6"  # the rest of the window
    # malformed keys and the master key are refused as well: no more guesses
    assert isinstance(fail(auth, "192.0.2.1", "sk-sluice-nonsense"), RateLimitError)
    assert isinstance(fail(auth, "192.0.2.1", MASTER), RateLimitError)
    assert keys.lookups == 3
    # another address is not affected
    assert isinstance(fail(auth, "192.0.2.2"), AuthenticationError)
    assert asyncio.run(auth.authenticate(bearer(MASTER), b"", "192.0.2.2")).key is None
    # once the window has ended the address may try again
    clock.now += 6
    assert isinstance(fail(auth, "192.0.2.1"), AuthenticationError)
    assert keys.lookups == 5


def test_a_locked_out_address_keeps_the_keys_already_verified() -> None:
    keys, clock, auth = locked_setup(limit=3)
    known, record = keys.add()
    asyncio.run(auth.authenticate(bearer(known), b"", "192.0.2.1"))
    for _ in range(3):
        fail(auth, "192.0.2.1")
    # fresh in the cache: answered without a lookup, by either path
    assert auth.recognise(bearer(known)) is not None
    assert asyncio.run(auth.authenticate(api_key(known), b"", "192.0.2.1")).key is record
    clock.now += 5  # past the cache's TTL: a verified key is looked up again as usual
    lookups = keys.lookups
    assert asyncio.run(auth.authenticate(bearer(known), b"", "192.0.2.1")).key is record
    assert keys.lookups == lookups + 1
    # a valid key this replica has never verified needs a lookup: refused while locked out
    other, _ = keys.add()
    assert isinstance(fail(auth, "192.0.2.1", other), RateLimitError)
    assert keys.lookups == lookups + 1


def test_requests_without_a_key_are_not_counted_as_failures() -> None:
    _, _, auth = locked_setup(limit=3)
    for _ in range(10):
        with pytest.raises(AuthenticationError, match="didn't provide"):
            asyncio.run(auth.authenticate([(b"host", b"x")], b"", "192.0.2.1"))
    assert isinstance(fail(auth, "192.0.2.1"), AuthenticationError)


def test_revoked_and_expired_keys_count_as_failures() -> None:
    keys, _, auth = locked_setup(limit=2)
    revoked, _ = keys.add(revoked_at=datetime.now(UTC))
    expired, _ = keys.add(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert fail(auth, "192.0.2.1", revoked).code == "key_revoked"  # type: ignore[attr-defined]
    assert fail(auth, "192.0.2.1", expired).code == "key_expired"  # type: ignore[attr-defined]
    assert isinstance(fail(auth, "192.0.2.1"), RateLimitError)


def test_ipv6_addresses_count_by_their_64_network() -> None:
    _, _, auth = locked_setup(limit=2)
    fail(auth, "2001:db8::1")
    fail(auth, "2001:db8::ffff:2")
    assert isinstance(fail(auth, "2001:db8::3"), RateLimitError)
    assert isinstance(fail(auth, "2001:db8:0:1::1"), AuthenticationError)  # another /64
    # an IPv4 address written as IPv6 counts as itself
    fail(auth, "::ffff:192.0.2.9")
    fail(auth, "192.0.2.9")
    assert isinstance(fail(auth, "192.0.2.9"), RateLimitError)


def test_the_address_table_is_bounded_and_forgets_the_oldest_window() -> None:
    clock = Clock()
    lockout = AddressLockout(limit=1, window=10.0, capacity=100, clock=clock)
    lockout.failed("192.0.2.1")
    with pytest.raises(RateLimitError):
        lockout.check("192.0.2.1")
    for n in range(10_000):
        lockout.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(lockout) == 100
    lockout.check("192.0.2.1")  # forgotten: the price of a bounded table
    clock.now += 10
    lockout.failed("192.0.2.2")  # windows that ended are dropped as new ones begin
    assert len(lockout) == 1


def test_a_zero_limit_turns_the_lockout_off() -> None:
    lockout = AddressLockout(limit=0, window=10.0, capacity=100)
    for _ in range(100):
        lockout.failed("192.0.2.1")
    lockout.check("192.0.2.1")
    assert len(lockout) == 0
