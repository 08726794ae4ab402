"""Bulk INSERTs on hot paths: one statement, many rows, through the driver's executemany.

``connection.execute(insert(table), rows)`` builds a parameter dictionary per row and runs each
value through SQLAlchemy's per-row machinery: about 8 us a row, more than the database spends
storing it. :class:`BulkInsert` renders the INSERT once per dialect, applies the bind processors
SQLAlchemy itself would apply to each column (so values are stored exactly as through
``execute``), and hands the driver plain tuples with ``exec_driver_sql``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect

_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
"""The driver's own positional placeholder for each DBAPI paramstyle we run on."""


class BulkInsert:
    """``INSERT INTO table (columns) VALUES (...)`` for rows of values in ``columns`` order."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        unknown = [name for name in columns if name not in table.c]
        if unknown:
            raise ValueError(f"{table.name} has no columns {', '.join(unknown)}")
        self.table = table
        self.columns = tuple(columns)
        self._rendered: dict[str, tuple[str, tuple[Callable[[Any], Any] | None, ...]]] = {}

    def _render(self, dialect: Dialect) -> tuple[str, tuple[Callable[[Any], Any] | None, ...]]:
        rendered = self._rendered.get(dialect.name)
        if rendered is None:
            placeholder = _PLACEHOLDERS.get(dialect.loaded_dbapi.paramstyle)
            if placeholder is None:
                raise ValueError(f"no bulk insert for the {dialect.name} driver's paramstyle")
            preparer = dialect.identifier_preparer
            columns = ", ".join(preparer.quote(name) for name in self.columns)
            values = ", ".join(placeholder for _ in self.columns)
            sql = f"INSERT INTO {preparer.format_table(self.table)} ({columns}) VALUES ({values})"
            processors = tuple(
                self.table.c[name].type._cached_bind_processor(dialect) for name in self.columns
            )
            rendered = self._rendered[dialect.name] = (sql, processors)
        return rendered

    def execute(self, connection: Connection, rows: Iterable[Sequence[Any]]) -> int:
        """Insert ``rows`` in the connection's transaction; returns how many."""
        sql, processors = self._render(connection.dialect)
        # Column by column: each processor runs over its column in one C-level map.
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        if not columns:
            return 0
        for position, process in enumerate(processors):
            if process is not None:
                columns[position] = list(map(process, columns[position]))
        prepared = list(zip(*columns, strict=True))
        connection.exec_driver_sql(sql, prepared)
        return len(prepared)
