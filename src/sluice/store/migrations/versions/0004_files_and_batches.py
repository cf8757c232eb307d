"""Files and batches (OpenAI's Files and Batch API, `sluice.batches`), and the batch a
usage record belongs to.

``files`` holds each uploaded or written file's metadata; its content is on disk (the
default) or in ``file_contents``. ``batches`` holds a batch's state and timestamps;
``batch_lines`` one row per input line, claimed by a worker with a lease and holding the
line's answer once it has one. ``usage_records.batch_id`` names the batch of a line's
usage record.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sluice.store.types import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as table:
        table.add_column(sa.Column("batch_id", sa.Text(), nullable=True))
        table.create_index("ix_usage_records_batch_id", ["batch_id"])
    op.create_table(
        "files",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=True),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_key_id_created_at", "files", ["key_id", "created_at"])
    op.create_table(
        "file_contents",
        sa.Column("file_id", sa.Text(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("file_id", name="pk_file_contents"),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=True),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("input_file_id", sa.Text(), nullable=False),
        sa.Column("completion_window", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("output_file_id", sa.Text(), nullable=True),
        sa.Column("error_file_id", sa.Text(), nullable=True),
        sa.Column("errors", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("metadata", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("request_total", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        *(
            sa.Column(f"{moment}_at", UTCDateTime(), nullable=True)
            for moment in (
                "in_progress",
                "expires",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        ),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_index("ix_batches_key_id_created_at", "batches", ["key_id", "created_at"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.Text(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("not_before", UTCDateTime(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("batch_id", "line", name="pk_batch_lines"),
    )
    op.create_index("ix_batch_lines_batch_id_state", "batch_lines", ["batch_id", "state"])
    op.create_index("ix_batch_lines_state_lease_until", "batch_lines", ["state", "lease_until"])
    op.create_index(
        "ix_batch_lines_queued",
        "batch_lines",
        ["batch_id", "line"],
        sqlite_where=sa.text("state = 'queued'"),
        postgresql_where=sa.text("state = 'queued'"),
    )


def downgrade() -> None:
    op.drop_table("batch_lines")
    op.drop_table("batches")
    op.drop_table("file_contents")
    op.drop_table("files")
    with op.batch_alter_table("usage_records") as table:
        table.drop_index("ix_usage_records_batch_id")
        table.drop_column("batch_id")
