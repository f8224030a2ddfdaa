"""Identity: teams, hashed API keys, users' teams; owner indexes for per-user queries and limits.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
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
    op.create_table(
        "teams",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    # Batch mode: SQLite cannot add a foreign key to an existing table except by rebuilding it.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("team_id", sa.String(40), nullable=True))
        batch.create_foreign_key("fk_users_team_id_teams", "teams", ["team_id"], ["id"])
        batch.create_index("ix_users_team_id", ["team_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(40), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_index("ix_files_owner_id", "files", ["owner_id"])
    op.create_index("ix_jobs_owner_id", "jobs", ["owner_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id", "jobs")
    op.drop_index("ix_files_owner_id", "files")
    op.drop_table("api_keys")
    with op.batch_alter_table("users") as batch:
        batch.drop_index("ix_users_team_id")
        batch.drop_constraint("fk_users_team_id_teams", type_="foreignkey")
        batch.drop_column("team_id")
    op.drop_table("teams")
