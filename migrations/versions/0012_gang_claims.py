"""gang_claims: hosts held for a waiting job across hosts while lower-priority jobs there pause.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gang_claims",
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_gang_claims_job_id", "gang_claims", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_gang_claims_job_id", table_name="gang_claims")
    op.drop_table("gang_claims")
