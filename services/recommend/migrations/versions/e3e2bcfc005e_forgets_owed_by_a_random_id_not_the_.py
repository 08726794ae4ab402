"""forgets owed by a random id, not the person

Revision ID: e3e2bcfc005e
Revises: bd8b21f100d2
Create Date: 2026-11-23 06:50:57.266223
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "e3e2bcfc005e"
down_revision: str | Sequence[str] | None = "bd8b21f100d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Pending forgets keep only that a rebuild is owed and since when: each existing one gets a
    # random id in place of the person's.
    op.create_table(
        "recommend_forgets_owed",
        sa.Column("forget_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("forget_id"),
    )
    random_id = (
        "lower(hex(randomblob(16)))"
        if op.get_bind().dialect.name == "sqlite"
        else "md5(random()::text || clock_timestamp()::text)"
    )
    op.execute(
        f"INSERT INTO recommend_forgets_owed (forget_id, requested_at, due_at) "
        f"SELECT {random_id}, requested_at, due_at FROM recommend_forgets"
    )
    op.drop_table("recommend_forgets")
    op.rename_table("recommend_forgets_owed", "recommend_forgets")


def downgrade() -> None:
    # The persons cannot be named again: pending forgets are dropped with the ids.
    op.drop_table("recommend_forgets")
    op.create_table(
        "recommend_forgets",
        sa.Column("person_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person_id"),
    )
