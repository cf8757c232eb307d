"""The libraries whose private API Sluice uses: pinned, checked, and installed in range.

Each adapter that reaches past a library's public API names the releases its tests cover
(`sluice.versions.Covered`). pyproject.toml must pin the library to exactly that range,
and the installed version must be in it: on any other version these tests fail, so a CI
run on an untested release says so before anything else does.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sluice.http_protocol import UVICORN_RANGE
from sluice.store.sqlite_thread import AIOSQLITE_RANGE
from sluice.versions import Covered, release

ADAPTERS = {
    "uvicorn": (UVICORN_RANGE, "tests/api/test_http_protocol.py, tests/security/"),
    "aiosqlite": (AIOSQLITE_RANGE, "tests/store/"),
}
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pins() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {r.name: r for r in requirements}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_pyproject_pins_the_range_the_adapter_covers(name: str) -> None:
    covered, _ = ADAPTERS[name]
    assert covered.distribution == name
    pinned = pins()[name]
    assert pinned.specifier == covered.specifier, (
        f"pyproject.toml pins {name}{pinned.specifier}, the adapter covers {covered}: "
        "change both together"
    )


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_the_installed_version_is_one_the_tests_cover(name: str) -> None:
    covered, tests = ADAPTERS[name]
    installed = covered.installed()
    assert installed is not None, f"{name} is not installed"
    if not covered.covers(installed):
        pytest.fail(
            f"{name} {installed} is installed, but Sluice reaches into its private API and "
            f"its tests cover only {covered}. Install a version in that range, or run "
            f"{tests} on this one and widen the range (and pyproject.toml's pin).",
            pytrace=False,
        )


def test_covered_ranges() -> None:
    covered = Covered("lib", (0, 54), (0, 60))
    assert covered.specifier == ">=0.54,<0.60"
    assert str(covered) == "lib>=0.54,<0.60"
    assert [covered.covers(v) for v in ("0.54.0", "0.59.9", "0.55rc1", "0.60.0")] == [
        True,
        True,
        False,  # '55rc1' is not a release number
        False,
    ]
    assert not covered.covers("0.53.1")
    assert not covered.covers("1.0")
    assert not covered.covers("garbage")
    assert release("0.22.1") == (0, 22)
    assert release("3") is None
    assert covered.installed() is None  # no such distribution
