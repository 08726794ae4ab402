"""Engines and sessions for each service's database: SQLite by default, PostgreSQL in production.

Nothing here connects at import time: engines are built from a URL passed down from settings.

SQLite transactions: the ``sqlite3`` driver's legacy mode issues no BEGIN before SELECT or DDL, so a
read followed by a write is not atomic and a rolled-back migration leaves tables behind. The engine
therefore emits BEGIN itself. A deferred BEGIN keeps readers concurrent under WAL, but a transaction
that reads and then writes can fail with "database is locked" when another writer commits in
between; such transactions should run on :func:`for_writes`, which begins with ``BEGIN IMMEDIATE``
so writers queue on ``busy_timeout`` instead.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import ClauseElement
from sqlmodel import Session

SQLITE_BUSY_TIMEOUT_MS = 5_000
SQLITE_CACHE_KIB = 16_384
"""Page cache per connection (SQLite's default is 2 MiB): on a Collect load over 100,000
persons, 16 MiB saved about a tenth of the server's CPU in re-reading index pages."""

_BEGIN_IMMEDIATE_OPTION = "steward_sqlite_begin_immediate"


def normalise_url(url: str | URL) -> URL:
    """Parse a database URL, pointing plain PostgreSQL URLs at the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, *, pool_size: int = 10, max_overflow: int = 20) -> Engine:
    """Build an engine for a SQLite or PostgreSQL URL, tuned for a threaded gRPC server."""
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _make_sqlite_engine(parsed, pool_size=pool_size, max_overflow=max_overflow)
    if backend == "postgresql":
        return sqlalchemy.create_engine(
            parsed, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow
        )
    raise ValueError(f"unsupported database backend {backend!r}; use sqlite or postgresql")


def _is_memory_database(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def _make_sqlite_engine(url: URL, *, pool_size: int, max_overflow: int) -> Engine:
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if _is_memory_database(url):
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        database = url.database or ""
        if not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    engine = sqlalchemy.create_engine(url, **kwargs)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    # Take transaction control away from the sqlite3 driver; _begin_sqlite_transaction emits BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch the file to WAL (a persistent setting) unless it already is.

    The switch does not wait on busy_timeout: when several processes open a new file at once,
    all but one get "database is locked", so retry until the winner's switch is visible.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _begin_sqlite_transaction(connection: Connection) -> None:
    if connection.get_execution_options().get(_BEGIN_IMMEDIATE_OPTION):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def for_writes(engine: Engine) -> Engine:
    """The same engine (same pool), but SQLite transactions take the write lock when they begin.

    Use it for read-modify-write transactions (appending to a hash chain, bumping a cursor). On
    PostgreSQL it changes nothing.
    """
    return engine.execution_options(**{_BEGIN_IMMEDIATE_OPTION: True})


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A SQLModel session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, class_=Session, expire_on_commit=False)


def is_postgres(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "postgresql"


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


# Point reads on the driver -------------------------------------------------------------------


class DriverQuery:
    """A Core query compiled once for one engine's driver, run on a DBAPI cursor.

    For the hottest point reads (CheckConsent): around a query SQLite answers in about 10 µs,
    SQLAlchemy's Connection spends some 65 µs of Python (checkout events, BEGIN, the compiled
    cache, result processing, ROLLBACK). The statement is still written once in Core; only its
    execution skips those layers. Rows come back as the driver gives them: see
    :func:`driver_datetime` for SQLite's datetimes.
    """

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = compiled.string
        self._positions: list[str] | None = getattr(compiled, "positiontup", None)
        """Names of the positional parameters in order (SQLite's qmark); None for named ones."""

    def rows(self, cursor: Any, **values: Any) -> list[tuple[Any, ...]]:
        parameters: Any = (
            values if self._positions is None else [values[name] for name in self._positions]
        )
        cursor.execute(self.sql, parameters)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return rows


@contextmanager
def driver_cursor(engine: Engine) -> Iterator[Any]:
    """A cursor on a pooled DBAPI connection, handed back (and rolled back) after use.

    On SQLite the driver runs in autocommit (see ``_configure_sqlite_connection``), so each
    statement reads its own snapshot; on PostgreSQL the statements share one transaction.
    """
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
    finally:
        connection.close()


def driver_datetime(value: datetime | str) -> datetime:
    """A DateTime column's value as the driver returns it: sqlite3 gives ISO text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value
