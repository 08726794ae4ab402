"""Bulk INSERTs on hot paths: one statement, many rows, through the driver's executemany.

``connection.execute(insert(table), rows)`` builds a parameter dictionary per row and runs each
value through SQLAlchemy's per-row machinery: about 8 us a row, more than the database spends
storing it. :class:`BulkInsert` renders the INSERT once per dialect, applies the bind processors
SQLAlchemy itself would apply to each column (so values are stored exactly as through
``execute``), and hands the driver plain tuples with ``exec_driver_sql``.

On PostgreSQL through psycopg the rows go in one ``COPY ... FROM STDIN`` on the same
connection and transaction instead: an executemany runs one INSERT per row in the server and
adapts each row's parameters apart, which for 500 rows of Collect's events cost 11 us a row in
our process and 18 us in PostgreSQL's; COPY costs 6 and 13 (measured on this machine).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import JSON, Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError

_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
"""The driver's own positional placeholder for each DBAPI paramstyle we run on."""

Processor = Callable[[Any], Any]


class BulkInsert:
    """``INSERT INTO table (columns) VALUES (...)`` for rows of values in ``columns`` order."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        unknown = [name for name in columns if name not in table.c]
        if unknown:
            raise ValueError(f"{table.name} has no columns {', '.join(unknown)}")
        self.table = table
        self.columns = tuple(columns)
        self._rendered: dict[str, tuple[str, bool, tuple[Processor | None, ...]]] = {}

    def _render(self, dialect: Dialect) -> tuple[str, bool, tuple[Processor | None, ...]]:
        """(statement, whether it is a COPY, each column's bind processor) for the dialect."""
        rendered = self._rendered.get(dialect.name)
        if rendered is None:
            preparer = dialect.identifier_preparer
            table = preparer.format_table(self.table)
            columns = ", ".join(preparer.quote(name) for name in self.columns)
            types = [self.table.c[name].type for name in self.columns]
            if dialect.driver == "psycopg":
                # COPY's text format takes JSON as text: serialized here as the bind processor
                # would (the processor only wraps the value for psycopg to serialize each time).
                serialize = dialect._json_serializer or json.dumps  # type: ignore[attr-defined]
                processors = tuple(
                    type_._make_bind_processor(None, serialize)  # type: ignore[no-untyped-call]
                    if isinstance(type_, JSON)
                    else type_._cached_bind_processor(dialect)
                    for type_ in types
                )
                copy = f"COPY {table} ({columns}) FROM STDIN"
                rendered = self._rendered[dialect.name] = (copy, True, processors)
            else:
                placeholder = _PLACEHOLDERS.get(dialect.loaded_dbapi.paramstyle)
                if placeholder is None:
                    raise ValueError(f"no bulk insert for the {dialect.name} driver's paramstyle")
                values = ", ".join(placeholder for _ in self.columns)
                sql = f"INSERT INTO {table} ({columns}) VALUES ({values})"
                processors = tuple(type_._cached_bind_processor(dialect) for type_ in types)
                rendered = self._rendered[dialect.name] = (sql, False, processors)
        return rendered

    def execute(self, connection: Connection, rows: Iterable[Sequence[Any]]) -> int:
        """Insert ``rows`` in the connection's transaction; returns how many."""
        sql, is_copy, processors = self._render(connection.dialect)
        # Column by column: each processor runs over its column in one C-level map.
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        if not columns:
            return 0
        for position, process in enumerate(processors):
            if process is not None:
                columns[position] = _processed(process, columns[position])
        prepared = list(zip(*columns, strict=True))
        if is_copy:
            _copy(connection, sql, prepared)
        else:
            connection.exec_driver_sql(sql, prepared)
        return len(prepared)


def _processed(process: Processor, values: Sequence[Any]) -> list[Any]:
    """``process`` of each value, run once per distinct object.

    Rows of one batch often share a value object (the batch's arrival time, a set of purposes,
    an empty attribute map): a DateTime on SQLite or a JSON column costs 1-2 us a value to
    process, a lookup by identity a tenth of that. The rows keep every value alive meanwhile,
    so no identity is reused within the call.
    """
    done: dict[int, Any] = {}
    processed: list[Any] = []
    append = processed.append
    for value in values:
        key = id(value)
        result = done.get(key, done)
        if result is done:
            result = done[key] = process(value)
        append(result)
    return processed


def _copy(connection: Connection, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """``statement`` (a COPY FROM STDIN) fed ``rows`` on the connection's own DBAPI cursor.

    Driver errors are raised as SQLAlchemy's, as ``exec_driver_sql`` raises them: a duplicate
    key is an ``IntegrityError`` either way.
    """
    dialect = connection.dialect
    cursor = connection.connection.cursor()
    try:
        with cursor.copy(statement) as copy:  # type: ignore[attr-defined]
            write_row = copy.write_row
            for row in rows:
                write_row(row)
    except dialect.loaded_dbapi.Error as error:
        raise DBAPIError.instance(
            statement, None, error, dialect.loaded_dbapi.Error, dialect=dialect
        ) from error
    finally:
        cursor.close()
