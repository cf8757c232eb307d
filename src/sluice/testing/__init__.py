"""Test helpers shipped with Sluice: a mock OpenAI-compatible upstream."""

from sluice.testing.mock_upstream import (
    MockBehaviour,
    MockStats,
    MockUpstream,
    build_mock_app,
    run_mock_upstream,
)

__all__ = ["MockBehaviour", "MockStats", "MockUpstream", "build_mock_app", "run_mock_upstream"]
