"""Alembic environment for Sluice's store; run through ``sluice.store.migrate``."""
