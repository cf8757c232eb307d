"""The Redis fixtures of the limiter tests (a client that skips without Redis, a key prefix
of the test's own), shared by the limiter's and the leases' tests."""

from tests.pipeline.test_limits_redis import prefix, redis

__all__ = ["prefix", "redis"]
