"""The local engine: llama.cpp with continuous batching.

`Engine` and `GenerationStream` need llama-cpp-python (the ``local`` extra); they are
imported on first use, so the rest of this package works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sluice.engine.config import EngineConfig
from sluice.engine.metrics import EngineMetrics
from sluice.engine.types import (
    DecodeError,
    EngineClosedError,
    EngineError,
    EngineStats,
    GenerationEvent,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    QueueTimeoutError,
    Usage,
)

__all__ = [
    "DecodeError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineMetrics",
    "EngineStats",
    "GenerationEvent",
    "GenerationRequest",
    "GenerationStream",
    "PromptTooLongError",
    "QueueFullError",
    "QueueTimeoutError",
    "Usage",
]

if TYPE_CHECKING:
    from sluice.engine.engine import Engine
    from sluice.engine.sequence import GenerationStream


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from sluice.engine.engine import Engine

        return Engine
    if name == "GenerationStream":
        from sluice.engine.sequence import GenerationStream

        return GenerationStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
