"""Per-key rate limits: requests and tokens per minute, parallel requests; memory or Redis."""

from sluice.pipeline.limits.base import Admission, Limiter, LimitSpec, Reason, Scope, Ticket
from sluice.pipeline.limits.memory import MemoryLimiter
from sluice.pipeline.limits.redis_limiter import RedisLimiter

__all__ = [
    "Admission",
    "LimitSpec",
    "Limiter",
    "MemoryLimiter",
    "Reason",
    "RedisLimiter",
    "Scope",
    "Ticket",
]
