"""Test helpers shipped with Sluice: a mock OpenAI-compatible upstream, with faults."""

from sluice.testing.faults import MockFaults
from sluice.testing.mock_upstream import (
    MockBehaviour,
    MockStats,
    MockUpstream,
    build_mock_app,
    run_mock_upstream,
)

__all__ = [
    "MockBehaviour",
    "MockFaults",
    "MockStats",
    "MockUpstream",
    "build_mock_app",
    "run_mock_upstream",
]
