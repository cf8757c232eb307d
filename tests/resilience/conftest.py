from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sluice.testing import MockUpstream


@pytest.fixture
def a() -> Iterator[MockUpstream]:
    """The first deployment's upstream (healthy until a test injects faults)."""
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def b() -> Iterator[MockUpstream]:
    """The second deployment's upstream."""
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c
