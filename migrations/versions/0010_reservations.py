"""Reservations against starvation: since when a queued job has been passed over by jobs behind
it (jobs.passed_over_at), and the host held for it once that lasted too long (jobs.reserved_host);
an index in queue order for the scheduler's read of each user's oldest queued jobs.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("passed_over_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("reserved_host", sa.String(200), nullable=True))
    op.create_index("ix_jobs_reserved_host", "jobs", ["reserved_host"])
    # The queue read (core/scheduling.py `_read`): each user's oldest queued jobs, from the index.
    op.create_index("ix_jobs_queue_order", "jobs", ["status", "priority", "owner_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_order", table_name="jobs")
    op.drop_index("ix_jobs_reserved_host", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reserved_host")
        batch.drop_column("passed_over_at")
