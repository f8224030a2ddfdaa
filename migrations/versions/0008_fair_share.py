"""Fair share: decayed GPU-hours per user and team (gpu_usage), and up to when each running
job's GPUs were charged (jobs.usage_charged_at).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gpu_usage",
        sa.Column("principal", sa.String(60), primary_key=True),
        sa.Column("gpu_hours", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("usage_charged_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("usage_charged_at")
    op.drop_table("gpu_usage")
