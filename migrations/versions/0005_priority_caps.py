"""Priority caps: the highest job priority an admin allows a team, or one user, to ask for.

NULL means no cap of its own: a user falls back to the team's cap, a team to the service's
default band (TUNEQ_MEMBER_MAX_PRIORITY).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("teams", "users"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("max_priority", sa.Integer, nullable=True))


def downgrade() -> None:
    for table in ("teams", "users"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("max_priority")
