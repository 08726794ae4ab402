"""identifier references as wide as identifiers.id (BIGINT on PostgreSQL)

identifier_sources, copresence and merge_evidence named identifiers by a 32-bit INTEGER while
identifiers.id is a BIGINT: a graph past 2^31 identifiers could not have referred to its newest
ones. SQLite's INTEGER is 64-bit already, so only PostgreSQL changes.

Revision ID: b7c3e9a1d2f4
Revises: eed15ff4d9e6
Create Date: 2026-11-23 01:55:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7c3e9a1d2f4"
down_revision: str | Sequence[str] | None = "eed15ff4d9e6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("identifier_sources", "identifier_id"),
    ("copresence", "identifier_id"),
    ("merge_evidence", "identifier_id"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_nullable=False)
