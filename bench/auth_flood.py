#!/usr/bin/env python3
"""What the authenticator's defences against unknown-key floods cost, in-process.

Cases (one call each): ``recognise`` a cached key (the hot path); ``authenticate`` a key
from the key cache (the header cache missed: once per TTL per key); a made-up key that is
``remembered`` as unknown; a made-up key from a ``locked`` address; a ``fresh`` made-up key
read from an in-memory store (a task per read) and from SQLite (timed only). Without
``--only``: ns per call (best of ``--repeat``) for every case the tree on PYTHONPATH can
run, and the memory (tracemalloc) of a full unknown-key cache and address table. With
``--only CASE --calls N``: just N calls, for an instruction count (callgrind at two N, the
difference divided by the difference of N; N at most 15,000 for ``fresh``). Results and
notes: docs/security/auth.md.

    PYTHONPATH=src python bench/auth_flood.py [--repeat 7]
    PYTHONHASHSEED=0 PYTHONPATH=src valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/auth_flood.py --only locked --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluice.errors import SluiceError
from sluice.keys import format as key_format
from sluice.keys.store import KeyRecord, KeyStore
from sluice.pipeline.auth import Authenticator
from sluice.store.database import Database, default_database_url

try:
    from sluice.pipeline.auth_failures import AddressLockout, UnknownKeys
except ImportError:  # a tree from before them: only recognise, authenticate and fresh
    AddressLockout = UnknownKeys = None  # type: ignore[assignment,misc]

MASTER = "sk-master-for-the-auth-bench-0123"
Headers = list[tuple[bytes, bytes]]


class Keys:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}

    def add(self) -> str:
        new = key_format.generate()
        self.records[new.key_hash] = KeyRecord(id="key_1", key_hash=new.key_hash, display="x")
        return new.secret

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return self.records.get(key_hash)


def bearer(secret: str) -> Headers:
    return [(b"host", b"x"), (b"authorization", f"Bearer {secret}".encode())]


def made_up(count: int) -> list[Headers]:
    return [bearer(key_format.generate().secret) for _ in range(count)]


class Bench:
    """Each case: a function running it ``n`` times."""

    def __init__(self, most_calls: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.keys = Keys()
        extra: dict[str, Any] = {}
        if UnknownKeys is not None:
            extra = {
                "unknown_keys": UnknownKeys(10_000, 1e9),
                "lockout": AddressLockout(20, 1e9, 10_000),
            }
        self.auth = Authenticator(self.keys, MASTER, cache_ttl=1e9, **extra)  # type: ignore[arg-type]
        valid = self.keys.add()
        self.valid = bearer(valid)
        self.valid_other_form: Headers = [(b"api-key", valid.encode())]
        self.run(self.auth, [self.valid], 1, "192.0.2.1")
        self.pool = made_up(2_000)
        self.most_calls = most_calls

    def run(self, auth: Authenticator, many: list[Headers], n: int, client: str) -> None:
        async def attempts() -> None:
            for i in range(n):
                with contextlib.suppress(SluiceError):
                    if UnknownKeys is None:
                        await auth.authenticate(many[i % len(many)])
                    else:
                        await auth.authenticate(many[i % len(many)], b"", client)

        self.loop.run_until_complete(attempts())

    def cases(self) -> dict[str, Callable[[int], None]]:
        auth = self.auth

        def recognise(n: int) -> None:
            for _ in range(n):
                auth.recognise(self.valid)

        cases = {
            "recognise": recognise,
            "authenticate": lambda n: self.run(auth, [self.valid_other_form], n, "192.0.2.1"),
        }
        if UnknownKeys is not None:
            self.run(auth, self.pool, len(self.pool), "192.0.2.2")  # all remembered now
            cases["remembered"] = lambda n: self.run(auth, self.pool, n, "192.0.2.3")
            for headers in made_up(20):  # its window never ends here
                self.run(auth, [headers], 1, "192.0.2.4")
            cases["locked"] = lambda n: self.run(auth, self.pool, n, "192.0.2.4")
        # a new key each call, read from the store: no unknown-key cache, no lockout
        plain = Authenticator(self.keys, MASTER, cache_ttl=1e9)  # type: ignore[arg-type]
        fresh = iter(made_up(self.most_calls))
        cases["fresh"] = lambda n: self.run(plain, [next(fresh) for _ in range(n)], n, "x")
        return cases


def sqlite_fresh_ns(repeat: int) -> float:
    """A made-up key read from a real (empty) SQLite key store, as `sluice serve` opens it."""

    async def measure() -> float:
        with tempfile.TemporaryDirectory() as directory:
            db = Database(default_database_url(Path(directory)))
            await db.start()
            auth = Authenticator(KeyStore(db), MASTER)
            best = float("inf")
            for _ in range(repeat):
                keys = made_up(500)
                started = time.perf_counter()
                for headers in keys:
                    with contextlib.suppress(SluiceError):
                        await auth.authenticate(headers)
                best = min(best, (time.perf_counter() - started) / len(keys) * 1e9)
            await db.close()
            return best

    return asyncio.run(measure())


def best_ns(run: Callable[[int], None], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run(n)
        times.append(time.perf_counter() - started)
    return min(times) / n * 1e9


CALLS = {"recognise": 200_000, "authenticate": 20_000, "remembered": 20_000, "locked": 20_000}


def timings(repeat: int) -> dict[str, float]:
    bench = Bench(most_calls=2_000 * repeat)
    result = {
        name: best_ns(case, CALLS.get(name, 2_000), repeat) for name, case in bench.cases().items()
    }
    result["fresh, SQLite store"] = sqlite_fresh_ns(repeat)
    return result


def memory() -> dict[str, float]:
    if UnknownKeys is None:
        return {}
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    unknown = UnknownKeys(10_000, 1e9)
    for n in range(10_000):
        unknown.add(key_format.hash_key(f"made-up-{n}"))
    middle = tracemalloc.get_traced_memory()[0]
    lockout = AddressLockout(20, 1e9, 10_000)
    for n in range(10_000):
        lockout.failed(f"2001:db8:{n >> 8:x}:{n & 255:x}::1")
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(unknown) == len(lockout) == 10_000
    return {
        "unknown-key cache, 10,000 entries": (middle - before) / 2**20,
        "address table, 10,000 IPv6 /64s": (after - middle) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", help="run one case --calls times, print nothing")
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    if args.only:
        # the same set-up at every --calls (up to 15,000 for fresh), so that it cancels out
        fresh_keys = max(args.calls, 15_000) if args.only == "fresh" else 0
        Bench(most_calls=fresh_keys).cases()[args.only](args.calls)
        return
    result = {"ns per call": timings(args.repeat), "MiB": memory()}
    for section, rows in result.items():
        print(section)
        for name, value in rows.items():
            print(f"  {name:<40} {value:10.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
