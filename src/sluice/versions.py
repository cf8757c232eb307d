"""The library versions Sluice's speed tricks were written and tested for.

Two places reach past a library's public API for speed: `sluice.http_protocol` (uvicorn's
protocol internals, two of its methods copied) and `sluice.store.sqlite_thread`
(aiosqlite's private call that runs a function on a connection's thread). Each names the
versions its tests cover as a `Covered` range and, at start-up, asks whether the installed
version is in it; when it is not, the first refuses to start and the second falls back to
aiosqlite's public methods (each module says why). pyproject.toml pins each library to the
same range, and tests/test_versions.py fails when the pins, the ranges and the installed
versions disagree: widen a range only after running the tests its module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

Release = tuple[int, int]
"""A major.minor release, e.g. (0, 54)."""


def release(text: str) -> Release | None:
    """The major.minor of a version string ('0.54.1' -> (0, 54)); None when it has none."""
    parts = text.split(".")[:2]
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True, slots=True)
class Covered:
    """Releases of ``distribution`` from ``low`` up to, not including, ``below``."""

    distribution: str
    low: Release
    below: Release

    def covers(self, text: str) -> bool:
        found = release(text)
        return found is not None and self.low <= found < self.below

    def installed(self) -> str | None:
        """The installed version (from the distribution's metadata); None when absent."""
        try:
            return version(self.distribution)
        except PackageNotFoundError:
            return None

    @property
    def specifier(self) -> str:
        """The range as a pip version specifier, as pyproject.toml pins it."""
        return f">={self.low[0]}.{self.low[1]},<{self.below[0]}.{self.below[1]}"

    def __str__(self) -> str:
        return f"{self.distribution}{self.specifier}"
