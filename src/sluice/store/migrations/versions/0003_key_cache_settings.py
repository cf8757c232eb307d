"""Keys get their cache settings: a team, whether requests may steer the cache, and the
semantic cache opt-in.

``api_keys.team`` names the team whose keys may share cached answers (the cache's "team"
namespace); ``cache_controls`` says whether the key's requests may steer the cache
(``Cache-Control``, the body's ``cache`` field), true for existing keys as for new ones;
``semantic_cache`` opts the key in or out of the semantic cache (null: the model decides).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-20 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.add_column(sa.Column("team", sa.Text(), nullable=True))
        table.add_column(
            sa.Column(
                "cache_controls", sa.Boolean(), server_default=sa.text("true"), nullable=False
            )
        )
        table.add_column(sa.Column("semantic_cache", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("semantic_cache")
        table.drop_column("cache_controls")
        table.drop_column("team")
