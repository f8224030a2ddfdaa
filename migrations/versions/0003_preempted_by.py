"""Job.preempted_by: the preemption marker gets a column of its own (it lived in `progress`, which
the worker's event pump rewrites, so a preemption committed during a pump could be lost).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
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
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preempted_by", sa.String(40), nullable=True))
    # A job preempted just before the upgrade keeps its way back to the queue.
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("progress", sa.JSON),
                    sa.column("preempted_by", sa.String))
    bind = op.get_bind()
    for job_id, progress in bind.execute(sa.select(jobs.c.id, jobs.c.progress)).all():
        if isinstance(progress, dict) and progress.get("preempted_by"):
            rest = {k: v for k, v in progress.items() if k != "preempted_by"}
            bind.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(preempted_by=str(progress["preempted_by"])[:40], progress=rest))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempted_by")
