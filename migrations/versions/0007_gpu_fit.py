"""A job's least GPU memory (what its plan fits in) and the GPUs it runs on.

Workers take a queued job only on a host whose GPUs have min_gpu_memory_gib; `gpu` names the
GPUs of the host that runs (or last ran) it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("min_gpu_memory_gib", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gpu", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gpu")
        batch.drop_column("min_gpu_memory_gib")
