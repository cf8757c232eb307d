"""Who is calling: the master key, a virtual key, or nobody (401).

Keys are read from ``Authorization: Bearer <key>`` or ``api-key: <key>`` only; a key in the
query string is refused outright, so it never sits in an access log or a proxy's history.
The master key is compared in constant time. Virtual keys are looked up by their SHA-256
hash (the secret is never stored or logged) through a short-lived memory cache, which
``invalidate`` clears on revocation (across replicas through Redis pub/sub, see
`sluice.keys.invalidation`).

Unknown keys are remembered apart from valid ones, and failures are counted per client
address (`sluice.pipeline.auth_failures`): a flood of made-up keys neither evicts valid
keys from the cache nor costs more than a bounded number of store reads per address.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from sluice.errors import AuthenticationError, PermissionDeniedError
from sluice.keys import format as key_format
from sluice.keys.store import KeyRecord, KeyStore
from sluice.pipeline.auth_failures import AddressLockout, UnknownKeys

_MAX_CACHED = 50_000
_QUERY_KEY_NAMES = frozenset({"key", "api_key", "api-key", "apikey", "access_token"})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the master key (no key record) or a virtual key."""

    key: KeyRecord | None
    key_id: str | None = field(init=False)
    """The key's id (None for the master key): a field, not a property, as the end of every
    request reads it twice (a property is a Python-level call)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", self.key.id if self.key is not None else None)

    def authorize(self, model: str) -> None:
        """403 when the key may not use ``model``."""
        if self.key is not None and self.key.models is not None and model not in self.key.models:
            raise PermissionDeniedError(
                f"This API key ({self.key.display}) is not allowed to use the model '{model}'.",
                param="model",
            )


MASTER = Principal(key=None)
_NOT_CACHED: tuple[float, Principal | None] = (0.0, None)


def credential(headers: list[tuple[bytes, bytes]], query_string: bytes) -> str | None:
    """The key the client sent, from the headers it may use."""
    _refuse_key_in_query(query_string)
    found = _credential_header(headers)
    return None if found is None else found[2]


def _refuse_key_in_query(query_string: bytes) -> None:
    if query_string and _QUERY_KEY_NAMES & {
        name.lower() for name, _ in parse_qsl(query_string.decode("latin-1"))
    }:
        raise AuthenticationError(
            "API keys are not accepted in the query string; send 'Authorization: Bearer <key>'.",
            code="key_in_query_string",
        )


def _credential_header(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, str] | None:
    """The header that carries the key (name, raw value) and the key it carries."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return name, value, token.strip()
        elif name == b"api-key" and value.strip():
            return name, value, value.decode("latin-1").strip()
    return None


def _expired(record: KeyRecord) -> bool:
    return record.expires_at is not None and record.expires_at <= datetime.now(UTC)


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        master_key: str,
        cache_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        unknown_keys: UnknownKeys | None = None,
        lockout: AddressLockout | None = None,
    ) -> None:
        self._keys = keys
        self._master = master_key.encode()
        self._ttl = cache_ttl
        self._clock = clock
        # Unknown key hashes (no store read while remembered) and failures per client
        # address; None: neither. Apart from `_cache`, so unknown keys never evict valid ones.
        self._unknown = unknown_keys
        self._lockout = lockout
        # key hash -> (deadline, principal) of the keys the store knows, least recently read
        # first: when full, the oldest entry goes. An entry past its deadline stays until
        # then: it marks a key this replica has verified, which a locked-out address may
        # still have looked up.
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        # hash() of the credential header's value as sent, one dict per header name ->
        # (deadline, a virtual key's principal): `recognise` answers a key seen within the
        # TTL without parsing the header or hashing the key. hash() of bytes is SipHash-1-3
        # with 64 bits of output, keyed by the interpreter's per-process random secret: the
        # secret itself is never kept, and a stranger's header matches a cached one only by
        # a 64-bit collision under a key they do not know (a guess hits one of the at most
        # 50,000 entries with a chance below 2**-48; every miss goes on to `authenticate`,
        # SHA-256 and the store). It costs a fraction of BLAKE2b or SHA-256 (the store's
        # hash; docs/architecture.md). Plain dicts, not OrderedDicts:
        # they are read on the hot path, where a dict's look-up is the cheaper one.
        self._by_bearer: dict[int, tuple[float, Principal]] = {}
        self._by_api_key: dict[int, tuple[float, Principal]] = {}
        # key hash -> the store read in flight: concurrent misses of one key (every request
        # of a busy key, each time its entry expires; or a flood of one unknown key) share
        # one read instead of each opening its own. ``_generation`` changes on invalidation,
        # so a read that began before a revocation does not put its (stale) answer in the
        # cache.
        self._reads: dict[str, asyncio.Task[Principal | None]] = {}
        self._generation = 0

    def recognise(self, headers: list[tuple[bytes, bytes]]) -> Principal | None:
        """The principal of a virtual key authenticated within the cache TTL, from the same
        credential header, still unrevoked and unexpired; None sends the caller to
        `authenticate` (which also raises every error)."""
        for name, value in headers:
            if name == b"authorization":
                entry = self._by_bearer.get(hash(value))
                break
            if name == b"api-key":
                entry = self._by_api_key.get(hash(value))
                break
        else:
            return None
        if entry is None:
            return None
        deadline, principal = entry
        record = principal.key
        if (
            deadline <= self._clock()
            or record is None
            or record.revoked_at is not None
            or (record.expires_at is not None and _expired(record))
        ):
            return None
        return principal

    async def authenticate(
        self,
        headers: list[tuple[bytes, bytes]],
        query_string: bytes = b"",
        client: str | None = None,
    ) -> Principal:
        """The caller's principal, or the 401; ``client`` is the peer's address, whose failed
        attempts are counted (429 once it has failed too often, see `AddressLockout`)."""
        _refuse_key_in_query(query_string)
        found = _credential_header(headers)
        if found is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        name, value, secret = found
        # A key seen within the cache TTL costs one SHA-256 and a dict look-up (its checksum
        # was verified when it was cached).
        key_hash = key_format.hash_key(secret)
        deadline, principal = self._cache.get(key_hash, _NOT_CACHED)
        record = None if principal is None else principal.key
        try:
            if record is None or record.revoked_at is not None or deadline <= self._clock():
                principal = await self._identify(secret, key_hash, client)
                record = principal.key
                # the deadline of the key-hash entry (set by _read when it went to the store)
                deadline = self._cache.get(key_hash, _NOT_CACHED)[0]
            if record is not None and _expired(record):
                raise AuthenticationError(
                    f"The API key {record.display} has expired.", code="key_expired"
                )
        except AuthenticationError:
            if self._lockout is not None:
                self._lockout.failed(client)
            raise
        assert principal is not None
        if record is not None:
            by_header = self._by_bearer if name == b"authorization" else self._by_api_key
            header_hash = hash(value)
            if len(by_header) >= _MAX_CACHED and header_hash not in by_header:
                _make_room(by_header, self._clock())
            by_header[header_hash] = (deadline, principal)
        return principal

    async def _identify(self, secret: str, key_hash: str, client: str | None) -> Principal:
        """The principal of a key not in the cache (or past its deadline there)."""
        if self._lockout is not None and key_hash not in self._cache:
            # Refused while the address is locked out, before any work: the master key
            # (a guessable secret), malformed keys and every key this replica has not
            # verified. A key it has verified is looked up as usual.
            self._lockout.check(client)
        if hmac.compare_digest(secret.encode(), self._master):
            return MASTER
        if not key_format.well_formed(secret):
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        if self._unknown is not None and key_hash in self._unknown:
            principal = None
        else:
            principal = await self._lookup(key_hash)
        if principal is None:
            raise AuthenticationError(
                f"Incorrect API key provided: {key_format.display(secret)}.", code="invalid_api_key"
            )
        return principal

    def invalidate(self, key_hash: str | None = None) -> None:
        """Forget one cached key (or all): the next request reads the store again."""
        self._generation += 1
        if key_hash is None:
            self._cache.clear()
            self._reads.clear()
            if self._unknown is not None:
                self._unknown.clear()
        else:
            self._cache.pop(key_hash, None)
            self._reads.pop(key_hash, None)
        # keyed by what clients send, not by key: all of it
        self._by_bearer.clear()
        self._by_api_key.clear()

    async def _lookup(self, key_hash: str) -> Principal | None:
        """The key's principal (None: unknown), through the cache; 401 for a revoked key."""
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > self._clock():
            principal: Principal | None = cached[1]
        else:
            read = self._reads.get(key_hash)
            if read is None:
                read = asyncio.ensure_future(self._read(key_hash, self._generation))
                self._reads[key_hash] = read
                read.add_done_callback(lambda done: self._read_done(key_hash, done))
            # Shielded: a caller that goes away does not cancel the others' read.
            principal = await asyncio.shield(read)
        record = None if principal is None else principal.key
        if record is not None and record.revoked_at is not None:
            raise AuthenticationError(
                f"The API key {record.display} has been revoked.", code="key_revoked"
            )
        return principal

    async def _read(self, key_hash: str, generation: int) -> Principal | None:
        """Read one key from the store and cache the answer, unless invalidated meanwhile."""
        record = await self._keys.get_by_hash(key_hash)
        principal = None if record is None else Principal(record)
        if generation == self._generation:
            if principal is None:
                if self._unknown is not None:
                    self._unknown.add(key_hash)
            else:
                cache = self._cache
                if cache.pop(key_hash, None) is None and len(cache) >= _MAX_CACHED:
                    cache.popitem(last=False)
                cache[key_hash] = (self._clock() + self._ttl, principal)
        return principal

    def _read_done(self, key_hash: str, read: asyncio.Task[Principal | None]) -> None:
        if self._reads.get(key_hash) is read:
            del self._reads[key_hash]
        if not read.cancelled():
            read.exception()  # retrieved: every waiter got it (a caller may have left)


def _make_room(entries: dict[int, tuple[float, Principal]], now: float) -> None:
    """Room in a full header cache: the expired entries go, and when fewer than a quarter
    had expired, the oldest of the rest too (by first insertion: an entry renewed in place
    keeps its place), down to three quarters full. The dict is rebuilt at most once per
    quarter of its size in inserts, a constant cost per insert on average, where taking its
    first entry one at a time would scan the holes that deletions leave at the front of a
    dict."""
    keep = _MAX_CACHED * 3 // 4
    fresh = [(k, entry) for k, entry in entries.items() if entry[0] > now]
    entries.clear()
    entries.update(itertools.islice(fresh, max(len(fresh) - keep, 0), None))
