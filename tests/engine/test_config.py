"""Engine settings refused at construction."""

from __future__ import annotations

from typing import Any

import pytest

from sluice.engine.config import EngineConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_ctx": 8},
        {"parallel": 0},
        {"threads": 0},
        {"batch_size": 4, "parallel": 4},
        {"max_queue": -1},
        {"max_queue_wait_s": 0},
        {"prefill_chunk": 0},
        {"step_tokens": 8, "parallel": 8},
    ],
)
def test_engine_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        EngineConfig(**kwargs)


def test_engine_config_threads_default_to_cores() -> None:
    assert EngineConfig().n_threads >= 1
    assert EngineConfig(threads=3).n_threads == 3
