"""gang_members: the hosts of a job across hosts and their part in its current attempt.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gang_members",
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("node_rank", sa.Integer(), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False, unique=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("endpoint", sa.String(300), nullable=True),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("resume_checkpoint", sa.String(40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("joined_at", sa.Float(), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("gang_members")
