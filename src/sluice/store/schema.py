"""The tables, as SQLAlchemy Core ``Table`` objects on one ``MetaData``.

The database schema itself is created and changed only by the Alembic migrations in
``sluice/store/migrations/versions``; keep these definitions and the newest migration
in step (``tests/store/test_migrations.py`` compares them).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    text,
)

from sluice.store.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),  # "key_<12 hex>"
    Column("key_hash", Text, nullable=False, unique=True),  # hex sha256 of the secret
    Column("display", Text, nullable=False),  # prefix + "…" + last 4
    Column("models", JSON(none_as_null=True), nullable=True),  # null: every model
    Column("model_limits", JSON(none_as_null=True), nullable=True),  # {model: {rpm, tpm}}
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_parallel", Integer, nullable=True),
    Column("budget_usd", Float, nullable=True),
    Column("budget_period", Text, nullable=True),  # daily | weekly | monthly | null: lifetime
    Column("spend_usd", Float, nullable=False, server_default=text("0")),
    Column("period_started_at", UTCDateTime(), nullable=True),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("metadata", JSON, nullable=False, server_default=text("'{}'")),
    Column("created_at", UTCDateTime(), nullable=False),
    # the embedded engine's queue order for this key's requests (higher first)
    Column("priority", Integer, nullable=False, server_default=text("0")),
    # the cache's per-key settings: the team whose keys may share answers, whether the
    # request may steer the cache, and the semantic cache opt-in (null: the model decides)
    Column("team", Text, nullable=True),
    Column("cache_controls", Boolean, nullable=False, server_default=text("true")),
    Column("semantic_cache", Boolean, nullable=True),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("key_id", Text, nullable=True),
    Column("model", Text, nullable=False),
    Column("deployment", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=False, server_default=text("0")),
    Column("completion_tokens", Integer, nullable=False, server_default=text("0")),
    Column("cost_usd", Float, nullable=False, server_default=text("0")),
    Column("latency_ms", Float, nullable=False, server_default=text("0")),
    Column("status", Integer, nullable=False),
    Column("cache_hit", Boolean, nullable=False, server_default=text("false")),
    Column("stream", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", UTCDateTime(), nullable=False),
    # the client's X-Request-ID, for correlation only (request_id is the server's)
    Column("client_request_id", Text, nullable=True),
    # the batch a request was a line of (`sluice.batches`); null for interactive requests
    Column("batch_id", Text, nullable=True),
    Index(None, "key_id"),
    Index(None, "client_request_id"),
    Index(None, "created_at"),
    Index(None, "batch_id"),
)

# Files uploaded through the Files API (`sluice.batches.files`) and written by batches.
files = Table(
    "files",
    metadata,
    Column("id", Text, primary_key=True),  # "file-<24 hex>"
    Column("key_id", Text, nullable=True),  # the owner; null: the master key (or no keys)
    Column("purpose", Text, nullable=False),  # batch | batch_output
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("storage", Text, nullable=False),  # where the content is: disk | database
    Column("created_at", UTCDateTime(), nullable=False),
    Index(None, "key_id", "created_at"),
)

# A file's content when kept in the database (files.storage = 'database').
file_contents = Table(
    "file_contents",
    metadata,
    Column("file_id", Text, primary_key=True),
    Column("content", LargeBinary, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Text, primary_key=True),  # "batch_<24 hex>"
    Column("key_id", Text, nullable=True),
    Column("endpoint", Text, nullable=False),
    Column("input_file_id", Text, nullable=False),
    Column("completion_window", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("output_file_id", Text, nullable=True),
    Column("error_file_id", Text, nullable=True),
    Column("errors", JSON(none_as_null=True), nullable=True),  # validation errors, by line
    Column("metadata", JSON(none_as_null=True), nullable=True),
    Column("request_total", Integer, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("in_progress_at", UTCDateTime(), nullable=True),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("finalizing_at", UTCDateTime(), nullable=True),
    Column("completed_at", UTCDateTime(), nullable=True),
    Column("failed_at", UTCDateTime(), nullable=True),
    Column("expired_at", UTCDateTime(), nullable=True),
    Column("cancelling_at", UTCDateTime(), nullable=True),
    Column("cancelled_at", UTCDateTime(), nullable=True),
    Index(None, "status"),
    Index(None, "key_id", "created_at"),
)

# One row per line of a batch's input: claimed with a lease, its result written once.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", Text, primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based, as the error messages count
    Column("custom_id", Text, nullable=False),
    Column("body", Text, nullable=False),  # the request body as uploaded (JSON text)
    # queued | running | done | failed | cancelled | expired
    Column("state", Text, nullable=False, server_default=text("'queued'")),
    Column("lease_owner", Text, nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # not claimed before this (a line the gateway refused for now: its key's rate limit)
    Column("not_before", UTCDateTime(), nullable=True),
    Column("status_code", Integer, nullable=True),  # the answer's HTTP status
    Column("result", Text, nullable=True),  # the answer's body (JSON text)
    Column("request_id", Text, nullable=True),  # the usage record's
    Index(None, "batch_id", "state"),
    Index(None, "state", "lease_until"),
    # the queue itself: claims read only queued lines, in batch and line order
    Index(
        "ix_batch_lines_queued",
        "batch_id",
        "line",
        sqlite_where=text("state = 'queued'"),
        postgresql_where=text("state = 'queued'"),
    ),
)
