"""persons get an integer key; identifiers and roots refer to it

The public person id stays random; identifiers.person_key and persons.root_key point at the new
integer persons.key, so new rows append to those indexes instead of dirtying random pages.
Existing rows keep their identifier ids; persons get keys in order of creation.

Revision ID: eed15ff4d9e6
Revises: 67e64e544229
Create Date: 2026-11-23 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "eed15ff4d9e6"
down_revision: str | Sequence[str] | None = "67e64e544229"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _id(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def _identifiers_table(name: str, person_column: sa.Column[object]) -> None:
    op.create_table(
        name,
        sa.Column("id", _KEY, autoincrement=True, nullable=False),
        sa.Column("digest", _id(96), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("namespace", _id(64), nullable=False),
        person_column,
        sa.Column("quarantined", sa.Boolean(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )


def _rename_postgres_names(table: str, renames: Sequence[tuple[str, str]]) -> None:
    """Constraints and sequences of a table built as <table>_new take their usual names."""
    for old, new in renames:
        if old.endswith("_seq"):
            op.execute(f"ALTER SEQUENCE {old} RENAME TO {new}")
        else:
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {old} TO {new}")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "persons_new",
        sa.Column("key", _KEY, autoincrement=True, nullable=False),
        sa.Column("person_id", _id(40), nullable=False),
        sa.Column("root_key", sa.BigInteger(), nullable=False),
        sa.Column("alias_of", _id(40), nullable=True),
        sa.Column("merged_by", _id(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        sa.UniqueConstraint("person_id"),
    )
    op.execute(
        "INSERT INTO persons_new (person_id, root_key, alias_of, merged_by, created_at)"
        " SELECT person_id, 0, alias_of, merged_by, created_at FROM persons"
        " ORDER BY created_at, person_id"
    )
    op.execute(
        "UPDATE persons_new SET root_key = (SELECT r.key FROM persons p"
        " JOIN persons_new r ON r.person_id = p.root_id"
        " WHERE p.person_id = persons_new.person_id)"
    )
    _identifiers_table("identifiers_new", sa.Column("person_key", sa.BigInteger(), nullable=False))
    op.execute(
        "INSERT INTO identifiers_new"
        " (id, digest, type, namespace, person_key, quarantined, first_seen, last_seen)"
        " SELECT i.id, i.digest, i.type, i.namespace, p.key, i.quarantined, i.first_seen,"
        " i.last_seen FROM identifiers i JOIN persons_new p ON p.person_id = i.person_id"
    )
    op.drop_index("ix_persons_root_id", table_name="persons")
    op.drop_table("persons")
    op.drop_index("ix_identifiers_person_id", table_name="identifiers")
    op.drop_table("identifiers")
    op.rename_table("persons_new", "persons")
    op.rename_table("identifiers_new", "identifiers")
    if postgres:
        _rename_postgres_names(
            "persons",
            [
                ("persons_new_pkey", "persons_pkey"),
                ("persons_new_person_id_key", "persons_person_id_key"),
                ("persons_new_key_seq", "persons_key_seq"),
            ],
        )
        _rename_postgres_names(
            "identifiers",
            [
                ("identifiers_new_pkey", "identifiers_pkey"),
                ("identifiers_new_digest_key", "identifiers_digest_key"),
                ("identifiers_new_id_seq", "identifiers_id_seq"),
            ],
        )
        op.execute(
            "SELECT setval('identifiers_id_seq',"
            " COALESCE((SELECT max(id) FROM identifiers), 0) + 1, false)"
        )
    op.create_index("ix_persons_root_key", "persons", ["root_key"], unique=False)
    op.create_index("ix_identifiers_person_key", "identifiers", ["person_key"], unique=False)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "persons_old",
        sa.Column("person_id", _id(40), nullable=False),
        sa.Column("root_id", _id(40), nullable=False),
        sa.Column("alias_of", _id(40), nullable=True),
        sa.Column("merged_by", _id(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person_id"),
    )
    op.execute(
        "INSERT INTO persons_old (person_id, root_id, alias_of, merged_by, created_at)"
        " SELECT p.person_id, r.person_id, p.alias_of, p.merged_by, p.created_at"
        " FROM persons p JOIN persons r ON r.key = p.root_key"
    )
    _identifiers_table("identifiers_old", sa.Column("person_id", _id(40), nullable=False))
    op.execute(
        "INSERT INTO identifiers_old"
        " (id, digest, type, namespace, person_id, quarantined, first_seen, last_seen)"
        " SELECT i.id, i.digest, i.type, i.namespace, p.person_id, i.quarantined, i.first_seen,"
        " i.last_seen FROM identifiers i JOIN persons p ON p.key = i.person_key"
    )
    op.drop_index("ix_persons_root_key", table_name="persons")
    op.drop_table("persons")
    op.drop_index("ix_identifiers_person_key", table_name="identifiers")
    op.drop_table("identifiers")
    op.rename_table("persons_old", "persons")
    op.rename_table("identifiers_old", "identifiers")
    if postgres:
        _rename_postgres_names("persons", [("persons_old_pkey", "persons_pkey")])
        _rename_postgres_names(
            "identifiers",
            [
                ("identifiers_old_pkey", "identifiers_pkey"),
                ("identifiers_old_digest_key", "identifiers_digest_key"),
                ("identifiers_old_id_seq", "identifiers_id_seq"),
            ],
        )
        op.execute(
            "SELECT setval('identifiers_id_seq',"
            " COALESCE((SELECT max(id) FROM identifiers), 0) + 1, false)"
        )
    op.create_index("ix_persons_root_id", "persons", ["root_id"], unique=False)
    op.create_index("ix_identifiers_person_id", "identifiers", ["person_id"], unique=False)
