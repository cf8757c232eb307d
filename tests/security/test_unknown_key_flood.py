"""Floods of made-up keys (issue 18, point 5).

A virtual key's checksum is public, so anyone can make keys that pass it, and each new one
costs a store read. Such a flood must not evict valid keys from the cache, its store reads
must be bounded per client address, and the authenticator's memory must stay bounded.
"""

from __future__ import annotations

import os
import random
import string
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sluice.errors import AuthenticationError, RateLimitError
from sluice.keys import format as key_format
from sluice.pipeline import auth as auth_module
from sluice.pipeline.auth import Authenticator
from sluice.pipeline.auth_failures import AddressLockout, UnknownKeys
from sluice.testing.mock_upstream import MockUpstream
from tests.api.test_keys_and_limits import MASTER, auth_config
from tests.gateway import running_gateway
from tests.pipeline.test_auth import Clock, FakeKeys, api_key, bearer

FLOOD = 100_000
FRESH = 20_000  # twice the tables' capacity; each costs a store read (a task), so fewer
_ALPHABET = string.digits + string.ascii_letters


def made_up_keys(count: int, seed: int) -> Iterator[str]:
    """Well-formed keys, as an attacker makes them: random body, public checksum (CRC32 of
    the body in six base62 digits)."""
    rng = random.Random(seed)
    for _ in range(count):
        body = "".join(rng.choices(_ALPHABET, k=32))
        value, digits = zlib.crc32(body.encode()), []
        for _ in range(6):
            value, digit = divmod(value, 62)
            digits.append(_ALPHABET[digit])
        yield key_format.PREFIX + body + "".join(reversed(digits))


def test_made_up_keys_pass_the_checksum() -> None:
    assert all(key_format.well_formed(key) for key in made_up_keys(100, seed=1))


async def flood(
    auth: Authenticator, keys: Iterator[str], clients: Iterator[str] | None = None
) -> int:
    """Send every key once (from each of ``clients`` in turn); the number of 429 answers."""
    refused = 0
    for key in keys:
        try:
            if clients is None:
                await auth.authenticate(bearer(key))
            else:
                await auth.authenticate(bearer(key), b"", next(clients))
        except RateLimitError:
            refused += 1
        except AuthenticationError:
            pass
        else:
            raise AssertionError("a made-up key was accepted")
    return refused


def one_address(address: str) -> Iterator[str]:
    while True:
        yield address


def many_addresses() -> Iterator[str]:
    n = 0
    while True:  # 10.0.0.0/8, then the same again
        yield f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        n += 1


async def test_a_flood_of_unknown_keys_leaves_valid_keys_cached_and_reads_bounded() -> None:
    keys, clock = FakeKeys(), Clock()
    unknown = UnknownKeys(capacity=10_000, ttl=60.0, clock=clock)
    lockout = AddressLockout(limit=20, window=10.0, capacity=10_000, clock=clock)
    auth = Authenticator(
        keys,  # type: ignore[arg-type]
        "sk-master-for-flood-tests-0123",
        cache_ttl=5.0,
        clock=clock,
        unknown_keys=unknown,
        lockout=lockout,
    )
    valid, record = keys.add()
    assert (await auth.authenticate(bearer(valid), b"", "192.0.2.1")).key is record
    assert keys.lookups == 1

    # One address, 100k fresh keys: 20 store reads, then 429 for the rest of the window.
    refused = await flood(auth, made_up_keys(FLOOD, seed=2), one_address("203.0.113.7"))
    assert keys.lookups == 1 + 20
    assert refused == FLOOD - 20

    # 100k addresses repeating 5,000 keys: each key read once, then remembered as unknown.
    pool = list(made_up_keys(5_000, seed=3))
    repeated = (pool[n % len(pool)] for n in range(FLOOD))
    assert await flood(auth, repeated, many_addresses()) == 0
    assert keys.lookups == 21 + 5_000

    # 20k addresses, 20k fresh keys: nothing to remember, a read each (the lockout counts
    # per address; see docs/security/auth.md), but every table stays within its bound.
    await flood(auth, made_up_keys(FRESH, seed=4), many_addresses())
    assert keys.lookups == 5_021 + FRESH
    assert len(unknown) <= 10_000
    assert len(lockout) <= 10_000

    # The valid key is still answered from the caches: no store read, by either path.
    assert auth.recognise(bearer(valid)) is not None
    assert (await auth.authenticate(api_key(valid), b"", "192.0.2.1")).key is record
    assert keys.lookups == 5_021 + FRESH


async def test_unknown_keys_never_enter_the_cache_of_valid_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even with no unknown-key cache and no lockout, and more unknown keys than the cache
    of valid keys holds."""
    monkeypatch.setattr(auth_module, "_MAX_CACHED", 1_000)
    keys, clock = FakeKeys(), Clock()
    auth = Authenticator(keys, "sk-master-for-flood-tests-0123", cache_ttl=5.0, clock=clock)  # type: ignore[arg-type]
    valid, _ = keys.add()
    await auth.authenticate(bearer(valid))
    await flood(auth, made_up_keys(5_000, seed=5))
    reads = keys.lookups
    await auth.authenticate(api_key(valid))
    assert keys.lookups == reads


@pytest.fixture
def gateway_url(upstream: MockUpstream, tmp_path: Path) -> Iterator[str]:
    os.environ["SLUICE_TEST_MASTER_KEY"] = MASTER
    config = auth_config(upstream.url, tmp_path)
    config["auth"].update(key_cache_ttl=5, failure_limit=5, failure_window=30)
    with running_gateway(config) as url:
        yield url.removesuffix("/v1")


def test_the_gateway_answers_429_to_an_address_that_keeps_failing(gateway_url: str) -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        master = {"Authorization": f"Bearer {MASTER}"}
        valid = client.post("/admin/keys", json={}, headers=master).json()["key"]
        verified = {"Authorization": f"Bearer {valid}"}
        assert client.post("/v1/chat/completions", json=chat, headers=verified).status_code == 200

        answers = [
            client.post("/v1/chat/completions", json=chat, headers={"api-key": key})
            for key in made_up_keys(20, seed=6)
        ]
        assert [a.status_code for a in answers] == [401] * 5 + [429] * 15
        refused = answers[-1]
        assert refused.json()["error"]["code"] == "too_many_auth_failures"
        assert 0 < int(refused.headers["retry-after"]) <= 30

        # the key verified before is still served; the admin API refuses even the master key
        assert client.post("/v1/chat/completions", json=chat, headers=verified).status_code == 200
        assert client.get("/admin/keys", headers=master).status_code == 429


@pytest.mark.parametrize("trusted", [True, False], ids=["behind-a-trusted-proxy", "direct"])
def test_the_failure_limit_keys_on_the_forwarded_address_only_from_trusted_proxies(
    upstream: MockUpstream, tmp_path: Path, trusted: bool
) -> None:
    """Behind a proxy every client has the proxy's address; ``server.trusted_proxies`` lets
    the limit see the real one, and a client talking directly cannot forge it."""
    from tests.gateway import GatewayProcess

    config = auth_config(upstream.url, tmp_path)
    config["auth"].update(failure_limit=3, failure_window=30)
    # Written with host bits set, as people do: uvicorn alone would trust no one then.
    config["server"] = {"trusted_proxies": ["127.0.0.1/8"] if trusted else []}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    gateway = GatewayProcess(config, tmp_path, env={"SLUICE_TEST_MASTER_KEY": MASTER}).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:

            def attempt(key: str, forwarded_for: str) -> int:
                headers = {"api-key": key, "x-forwarded-for": forwarded_for}
                return client.post("/v1/chat/completions", json=chat, headers=headers).status_code

            keys = list(made_up_keys(5, seed=7))
            assert [attempt(k, "203.0.113.7") for k in keys[:4]] == [401, 401, 401, 429]
            # Another client behind the same proxy: its own count, unless the header is
            # ignored, when it is the same peer address and already locked out.
            assert attempt(keys[4], "198.51.100.9") == (401 if trusted else 429)
    finally:
        gateway.stop()
