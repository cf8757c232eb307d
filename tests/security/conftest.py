"""The gateway fixtures of the keys-and-limits tests, on SQLite + memory and PostgreSQL +
Redis, for the security tests that need state."""

from tests.api.test_keys_and_limits import gw

__all__ = ["gw"]
