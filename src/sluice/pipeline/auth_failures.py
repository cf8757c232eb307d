"""What failed authentication lately: unknown key hashes, and the client addresses failing.

A virtual key's checksum is public (`sluice.keys.format`), so anyone can make
well-formed keys, and each new one costs a store read. Two bounded tables keep that cheap:

- `UnknownKeys` remembers the hashes the store did not know, so repeating one costs no
  read; it is apart from the cache of valid keys, which unknown keys can therefore never
  evict.
- `AddressLockout` counts failed authentications per client address in fixed windows:
  ``limit`` failures within one window lock the address out (429 with ``Retry-After``)
  until the window ends, before any store read.

Both forget their oldest entry when full (an `OrderedDict` kept in the order entries were
made), so a flood of keys or of addresses costs bounded memory. Neither runs on the path of
a key already in the authenticator's cache.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from sluice.errors import RateLimitError


class UnknownKeys:
    """Key hashes the store did not know, each for ``ttl`` seconds, at most ``capacity``.

    A hash can turn known only if someone creates exactly that key, and keys are made from
    190 random bits on the server: a long ``ttl`` is safe. `clear` empties it anyway when
    the whole key cache is invalidated.
    """

    def __init__(
        self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._clock = clock
        # key hash -> deadline, oldest first (every entry lives ``ttl``, so the expired
        # ones are at the front)
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key_hash: str) -> bool:
        deadline = self._seen.get(key_hash)
        return deadline is not None and deadline > self._clock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key_hash: str) -> None:
        if self._capacity <= 0 or self._ttl <= 0:
            return
        now = self._clock()
        seen = self._seen
        seen.pop(key_hash, None)
        while seen and (len(seen) >= self._capacity or seen[next(iter(seen))] <= now):
            seen.popitem(last=False)
        seen[key_hash] = now + self._ttl

    def clear(self) -> None:
        self._seen.clear()


class _Window:
    __slots__ = ("end", "failures")

    def __init__(self, end: float) -> None:
        self.end = end
        self.failures = 1


class AddressLockout:
    """At most ``limit`` failed authentications per client address per ``window`` seconds.

    The address is the TCP peer's (ASGI ``scope["client"]``); an IPv6 address counts as its
    /64 network, the block one subscriber usually holds. At most ``capacity`` addresses are
    tracked: past that the one whose window began first is forgotten. ``limit`` 0 turns the
    lockout off.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._capacity = capacity
        self._clock = clock
        # address -> its current window, in the order the windows began (all last
        # ``window`` seconds, so the ended ones are at the front)
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def check(self, address: str | None) -> None:
        """Raise the 429 while ``address`` is locked out."""
        if not self._windows:
            return  # nothing failed lately: the usual case costs one test
        window = self._windows.get(_bucket(address))
        if window is None or window.failures < self._limit:
            return
        wait = window.end - self._clock()
        if wait > 0:
            raise RateLimitError(
                "Too many failed authentication attempts from your address. "
                f"Please retry after {math.ceil(wait)} seconds.",
                code="too_many_auth_failures",
                headers={
                    "Retry-After": str(math.ceil(wait)),
                    "retry-after-ms": str(math.ceil(wait * 1000)),
                },
            )

    def failed(self, address: str | None) -> None:
        """Count one failed authentication from ``address``."""
        if self._limit <= 0:
            return
        now = self._clock()
        windows = self._windows
        while windows and windows[next(iter(windows))].end <= now:
            windows.popitem(last=False)
        bucket = _bucket(address)
        window = windows.get(bucket)
        if window is not None:
            window.failures += 1
            return
        if len(windows) >= self._capacity:
            windows.popitem(last=False)
        windows[bucket] = _Window(now + self._window)


def _bucket(address: str | None) -> str:
    """The key an address is counted under: IPv4 as it is, IPv6 by its /64 network."""
    if address is None:
        return ""  # no peer address (a Unix socket): all such clients count as one
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
