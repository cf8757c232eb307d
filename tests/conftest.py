from __future__ import annotations

from collections.abc import Iterator

import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway


@pytest.fixture(scope="session")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture(scope="session")
def gateway(upstream: MockUpstream) -> Iterator[str]:
    """A gateway in front of the shared mock upstream; yields its /v1 base URL."""
    with running_gateway(config_for(upstream.url)) as url:
        yield url
