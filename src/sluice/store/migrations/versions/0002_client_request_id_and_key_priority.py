"""Usage records keep the client's X-Request-ID beside the server's id; keys get a priority.

The usage record's primary key is the server-generated request id (a client could reuse
its own id to overwrite or skip records); the client's id is kept, indexed, for
correlation. ``api_keys.priority`` ranks a key's requests in the embedded engine's queue
(the request body no longer chooses it).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as table:
        table.add_column(sa.Column("client_request_id", sa.Text(), nullable=True))
    op.create_index("ix_usage_records_client_request_id", "usage_records", ["client_request_id"])
    with op.batch_alter_table("api_keys") as table:
        table.add_column(
            sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("priority")
    op.drop_index("ix_usage_records_client_request_id", table_name="usage_records")
    with op.batch_alter_table("usage_records") as table:
        table.drop_column("client_request_id")
