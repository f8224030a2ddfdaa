"""Checkpoints live in the shared store: where (storage_key), since when (uploaded_at), written by which host;
and the host a job runs (or last ran) on.

A checkpoint row is made when the trainer announces it; it can be resumed or continued from
(on any host) only once uploaded_at is set, and the API lists only those.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("storage_key", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("uploaded_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("host", sa.String(200), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("host", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("host")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("host")
        batch.drop_column("uploaded_at")
        batch.drop_column("storage_key")
