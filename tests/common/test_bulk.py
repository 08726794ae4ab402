"""BulkInsert stores exactly what ``connection.execute(insert(table), rows)`` stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services.common.bulk import BulkInsert

METADATA = MetaData()
SAMPLES = Table(
    "bulk_samples",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("via", String(8), nullable=False),
    Column("name", String(64), nullable=False),
    Column("big", BigInteger, nullable=False),
    Column("ratio", Float, nullable=False),
    Column("flag", Boolean, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tags", JSON, nullable=False),
    Column("blob", LargeBinary),
)
COLUMNS = ("id", "via", "name", "big", "ratio", "flag", "at", "tags", "blob")
# Not the table's order: values follow the order given to BulkInsert.
SHUFFLED = ("blob", "at", "id", "tags", "via", "flag", "ratio", "big", "name")

ROWS = [
    ("plain", 2**40, 0.5, True, datetime(2026, 11, 23, 9, 30, tzinfo=UTC), ["a", "b"], b"\x00\x01"),
    ("unicode é", -1, 1e-9, False, datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC), {"k": "v"}, None),
    (
        "offset",
        0,
        -3.25,
        True,
        datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))).astimezone(UTC),
        [],
        b"",
    ),
    (
        "tab\tnew\nline\\",
        7,
        float("inf"),
        False,
        datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC),
        {"q": "a\tb\\n", "none": None},
        b"\t\n\\",
    ),
]


def _stored(engine: Engine, via: str) -> list[tuple[object, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(*(SAMPLES.c[name] for name in COLUMNS if name not in ("id", "via")))
            .where(SAMPLES.c.via == via)
            .order_by(SAMPLES.c.id)
        )
        return [tuple(row) for row in rows]


@pytest.mark.parametrize("columns", [COLUMNS, SHUFFLED], ids=["table-order", "own-order"])
def test_rows_read_back_as_through_sqlalchemy(engine: Engine, columns: tuple[str, ...]) -> None:
    METADATA.create_all(engine)
    bulk = BulkInsert(SAMPLES, columns)
    with engine.begin() as connection:
        connection.execute(
            insert(SAMPLES),
            [dict(zip(COLUMNS, (i, "core", *row), strict=True)) for i, row in enumerate(ROWS)],
        )
        values = [
            dict(zip(COLUMNS, (100 + i, "bulk", *row), strict=True)) for i, row in enumerate(ROWS)
        ]
        assert bulk.execute(connection, [tuple(v[name] for name in columns) for v in values]) == 4
    assert _stored(engine, "bulk") == _stored(engine, "core")
    assert len(_stored(engine, "bulk")) == 4


def test_rows_sharing_value_objects_store_each_row_its_value(engine: Engine) -> None:
    METADATA.create_all(engine)
    at, tags = datetime(2026, 11, 23, 9, 30, tzinfo=UTC), {"shared": ["x"]}
    rows = [(i, "bulk", "n", i, 0.0, True, at, tags if i % 2 else [i], None) for i in range(6)]
    with engine.begin() as connection:
        BulkInsert(SAMPLES, COLUMNS).execute(connection, rows)
    stored = _stored(engine, "bulk")
    # SQLite hands back naive datetimes (in UTC)
    assert [row[4].replace(tzinfo=UTC) for row in stored] == [at] * 6
    assert [row[5] for row in stored] == [[0], tags, [2], tags, [4], tags]


def test_nothing_to_insert_runs_no_statement(engine: Engine) -> None:
    METADATA.create_all(engine)
    with engine.begin() as connection:
        assert BulkInsert(SAMPLES, COLUMNS).execute(connection, []) == 0


def test_unknown_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="no columns nickname"):
        BulkInsert(SAMPLES, ("id", "nickname"))


def test_a_failed_bulk_insert_rolls_back_with_its_transaction(engine: Engine) -> None:
    METADATA.create_all(engine)
    bulk = BulkInsert(SAMPLES, COLUMNS)
    row = (1, "bulk", *ROWS[0])
    # IntegrityError as from SQLAlchemy's own execute: Collect retries its batch on it.
    with pytest.raises(IntegrityError, match=r"(?i)unique|duplicate"), engine.begin() as connection:
        bulk.execute(connection, [row])
        bulk.execute(connection, [row])
    assert _stored(engine, "bulk") == []
