from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from sluice.testing.mock_upstream import MockUpstream
from tests.gateway import config_for, running_gateway

# Whatever a test starts without a data_dir (a gateway, `sluice serve` in a subprocess, a
# CLI command) keeps its SQLite database, files and spools under a directory of the test
# run's own, never the user's ~/.local/share/sluice.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="sluice-tests-")


@pytest.fixture(scope="session")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture(scope="session")
def gateway(upstream: MockUpstream) -> Iterator[str]:
    """A gateway in front of the shared mock upstream; yields its /v1 base URL."""
    with running_gateway(config_for(upstream.url)) as url:
        yield url
