#!/usr/bin/env python3
"""`sluice serve` with a sampler thread that writes the process's memory picture.

For finding what grows in a long run (bench/soak.py --probe starts the server through
this). Every ``SLUICE_PROBE_INTERVAL`` seconds (default 10) one JSON line goes to
``SLUICE_PROBE_OUT``:

    rss_kib        resident set (/proc/self/status VmRSS)
    traced_kib     what tracemalloc traces (Python allocations; only with tracemalloc on)
    malloc         glibc mallinfo2: arena (heap obtained), in_use, free, mmapped (KiB)
    sqlite_kib     sqlite3_memory_used(): every SQLite connection's page cache and more
    gc             gc.get_count(), collections per generation, objects tracked
    types          the 15 commonest object types among gc-tracked objects (and changes)
    top            with tracemalloc: the 15 source lines whose allocations grew most
                   since the first sample after ``SLUICE_PROBE_BASELINE`` seconds

``SLUICE_PROBE_TRACEMALLOC=N`` starts tracemalloc with N frames (it slows the server
several-fold: use it to find the growth, not to measure throughput). Usage, like
``sluice serve``:

    SLUICE_PROBE_OUT=probe.jsonl python bench/memory_probe.py --config X --port 8080
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _libc() -> Any:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _sqlite() -> Any:
    try:
        lib = ctypes.CDLL("libsqlite3.so.0")
    except OSError:
        return None
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sample(libc: Any, sqlite: Any, previous_types: Counter[str]) -> dict[str, Any]:
    info = libc.mallinfo2()
    objects = gc.get_objects()
    types = Counter(type(o).__name__ for o in objects)
    del objects
    changed = {
        name: n - previous_types.get(name, 0)
        for name, n in types.items()
        if abs(n - previous_types.get(name, 0)) >= 50
    }
    previous_types.clear()
    previous_types.update(types)
    out: dict[str, Any] = {
        "t": round(time.time(), 1),
        "rss_kib": rss_kib(),
        "malloc": {
            "arena": info.arena // 1024,
            "in_use": info.uordblks // 1024,
            "free": info.fordblks // 1024,
            "mmapped": info.hblkhd // 1024,
        },
        "sqlite_kib": sqlite.sqlite3_memory_used() // 1024 if sqlite is not None else None,
        "gc": {
            "count": gc.get_count(),
            "threshold": gc.get_threshold(),
            "collections": [s["collections"] for s in gc.get_stats()],
            "collected": [s["collected"] for s in gc.get_stats()],
            "tracked": sum(types.values()),
            "frozen": gc.get_freeze_count(),
            "garbage": len(gc.garbage),
        },
        "types": dict(types.most_common(15)),
        "types_changed": dict(sorted(changed.items(), key=lambda kv: -abs(kv[1]))[:15]),
        "threads": threading.active_count(),
    }
    if tracemalloc.is_tracing():
        out["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
    return out


def sampler(path: str, interval: float, baseline_after: float) -> None:
    libc, sqlite = _libc(), _sqlite()
    previous: Counter[str] = Counter()
    started = time.monotonic()
    base: tracemalloc.Snapshot | None = None
    with open(path, "a", buffering=1) as out:
        while True:
            time.sleep(interval)
            line = sample(libc, sqlite, previous)
            if tracemalloc.is_tracing() and time.monotonic() - started >= baseline_after:
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)]
                )
                if base is None:
                    base = snap
                else:
                    stats = snap.compare_to(base, "lineno")[:15]
                    line["top"] = [
                        f"{s.size_diff // 1024:+d} KiB {s.count_diff:+d} "
                        f"{s.traceback[0].filename}:{s.traceback[0].lineno}"
                        for s in stats
                    ]
            out.write(json.dumps(line) + "\n")


def main() -> None:
    frames = int(os.environ.get("SLUICE_PROBE_TRACEMALLOC", "0"))
    if frames:
        tracemalloc.start(frames)
    path = os.environ.get("SLUICE_PROBE_OUT", "memory-probe.jsonl")
    interval = float(os.environ.get("SLUICE_PROBE_INTERVAL", "10"))
    baseline = float(os.environ.get("SLUICE_PROBE_BASELINE", "30"))
    threading.Thread(
        target=sampler, args=(path, interval, baseline), name="memory-probe", daemon=True
    ).start()
    from sluice.cli import main as sluice

    sluice(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    main()
