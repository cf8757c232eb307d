"""Per-key rate limits: requests and tokens per minute, parallel requests; memory or Redis."""

from sluice.pipeline.limits.base import Admission, Limiter, LimitScope, LimitSpec, Reason, Ticket
from sluice.pipeline.limits.memory import MemoryLimiter
from sluice.pipeline.limits.redis_limiter import RedisLimiter

__all__ = [
    "Admission",
    "LimitScope",
    "LimitSpec",
    "Limiter",
    "MemoryLimiter",
    "Reason",
    "RedisLimiter",
    "Ticket",
]
