"""Which usage spool file a process writes, and which spool files it may replay.

Each process spools to a file of its own, ``data_dir/usage-spool.<pid>.jsonl`` (and renames
it to ``….replay`` while replaying it; see `sluice.store.recorder`). One shared file does
not work with several workers: each would append to it while another renamed it away for
replay, and records written after a reader's last read would be deleted with the file.

A spool outlives its process (that is its point), and a restarted worker gets a new pid, so
at start a process *adopts* the spool files of processes that are gone: every file in the
directory named ``usage-spool.<pid>.jsonl…`` whose pid is not running, and the unnumbered
``usage-spool.jsonl…`` of earlier versions. It claims each by renaming it to a name of its
own, ``usage-spool.<own pid>.jsonl.adopted-<random>``; a rename of one path succeeds for one
process only, so two workers starting together never both take a file. The recorder then
appends what it adopted to its own spool and replays that (writing a record twice is
harmless: records are keyed by request id). A process that dies while adopting leaves
files under its own pid, which the next process adopts in turn.

A live process's files are never taken: liveness is ``kill(pid, 0)``. Should a dead
worker's pid be reused by an unrelated process, its files wait until that process ends (or
until a Sluice process gets that pid, which replays its own files): late, never lost. The
data directory must be local to the host (pids mean nothing across hosts).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_NAME = re.compile(r"usage-spool(?:\.(\d+))?\.jsonl(?:\..+)?")
_ADOPTED = ".adopted-"


def spool_path(data_dir: Path, pid: int | None = None) -> Path:
    """This process's spool file."""
    return data_dir / f"usage-spool.{os.getpid() if pid is None else pid}.jsonl"


def adopt_orphans(own: Path, pid: int | None = None) -> list[Path]:
    """Claim the spool files beside ``own`` (this process's spool) whose process is gone,
    each renamed to an adopted name of this process; returns the adopted files, those a
    process of the same pid adopted before and did not finish with included."""
    pid = os.getpid() if pid is None else pid
    try:
        entries = sorted(own.parent.iterdir())
    except FileNotFoundError:
        return []
    adopted: list[Path] = []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None or entry.name in (own.name, own.name + ".replay"):
            continue
        owner = int(match.group(1)) if match.group(1) else None
        if owner == pid:
            if _ADOPTED in entry.name:
                adopted.append(entry)
            continue
        if owner is not None and _running(owner):
            continue
        target = own.with_name(f"{own.name}{_ADOPTED}{secrets.token_hex(6)}")
        try:
            entry.rename(target)
        except FileNotFoundError:  # another process claimed it first
            continue
        adopted.append(target)
    return adopted


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True
