from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, SQLModel

from services.common.db import (
    SQLITE_CACHE_KIB,
    DriverQuery,
    driver_cursor,
    driver_datetime,
    for_writes,
    is_postgres,
    is_sqlite,
    make_engine,
    session_factory,
)

metadata = MetaData()
parents = Table("test_db_parent", metadata, Column("id", Integer, primary_key=True))
children = Table(
    "test_db_child",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("parent_id", Integer, ForeignKey("test_db_parent.id"), nullable=False),
)
counter = Table("test_db_counter", metadata, Column("n", Integer, primary_key=True))
moments = Table(
    "test_db_moment",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String(32), nullable=False),
    Column("at", DateTime, nullable=False),
)


class Note(SQLModel, table=True):
    __tablename__ = "test_db_note"

    id: int | None = Field(default=None, primary_key=True)
    body: str


@pytest.mark.parametrize("url", ["postgresql://steward@db/steward", "postgres://steward@db/x"])
def test_postgres_urls_use_psycopg3_without_connecting(url: str) -> None:
    engine = make_engine(url)  # db does not resolve: building the engine must not connect

    assert engine.dialect.name == "postgresql"
    assert engine.dialect.driver == "psycopg"
    assert is_postgres(engine)
    assert not is_sqlite(engine)


def test_unsupported_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="mysql"):
        make_engine("mysql://root@localhost/steward")


def test_sqlite_file_gets_its_directory_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "data" / "consent" / "consent.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        assert path.parent.is_dir()
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == 5000
            assert pragma("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert pragma("PRAGMA cache_size").scalar() == -SQLITE_CACHE_KIB
    finally:
        engine.dispose()


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    engine = make_engine("sqlite://")
    metadata.create_all(engine, tables=[parents])
    seen: list[int] = []

    def count_rows() -> None:
        with engine.connect() as connection:
            seen.append(connection.execute(select(func.count()).select_from(parents)).scalar_one())

    with engine.begin() as connection:
        connection.execute(parents.insert(), [{"id": 1}, {"id": 2}])
    worker = threading.Thread(target=count_rows)
    worker.start()
    worker.join()

    assert seen == [2]
    engine.dispose()


def test_session_objects_stay_readable_after_commit(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine, tables=[Note.__table__])  # type: ignore[list-item]
    make_session = session_factory(engine)

    with make_session() as session:
        note = Note(body="kept")
        session.add(note)
        session.commit()

    assert note.id is not None
    assert note.body == "kept"
    with make_session() as session:
        assert session.get(Note, note.id) == note


def test_backend_is_detected(engine: Engine, db_url: str) -> None:
    assert is_postgres(engine) == db_url.startswith("postgresql")
    assert is_sqlite(engine) == db_url.startswith("sqlite")


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    metadata.create_all(engine, tables=[parents, children])

    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(children.insert().values(id=1, parent_id=42))


def test_failed_transaction_rolls_back_ddl_too(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as connection:
        metadata.create_all(connection, tables=[parents])
        connection.execute(parents.insert().values(id=1))
        raise RuntimeError("abandon")

    assert not inspect(engine).has_table("test_db_parent")


def test_rolled_back_savepoint_discards_only_its_own_writes(engine: Engine) -> None:
    metadata.create_all(engine, tables=[parents])

    with engine.begin() as connection:
        connection.execute(parents.insert().values(id=1))
        savepoint = connection.begin_nested()
        connection.execute(parents.insert().values(id=2))
        savepoint.rollback()

    with engine.connect() as connection:
        assert connection.execute(select(parents.c.id)).scalars().all() == [1]


def test_concurrent_read_modify_write_transactions_queue_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'counter.db'}")
    metadata.create_all(engine, tables=[counter])
    writer = for_writes(engine)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def append_next() -> None:
        start.wait()
        try:
            for _ in range(5):
                with writer.begin() as connection:
                    last = connection.execute(select(func.max(counter.c.n))).scalar() or 0
                    connection.execute(counter.insert().values(n=last + 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append_next) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    with engine.connect() as connection:
        values = connection.execute(select(counter.c.n).order_by(counter.c.n)).scalars().all()
    assert values == list(range(1, 41))
    engine.dispose()


def test_for_writes_takes_the_write_lock_when_the_transaction_begins(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    metadata.create_all(engine, tables=[parents])

    def insert_without_waiting(row_id: int) -> None:
        with engine.connect() as other:
            other.exec_driver_sql("PRAGMA busy_timeout=0")
            other.commit()
            with other.begin():
                other.execute(parents.insert().values(id=row_id))

    with engine.begin():
        insert_without_waiting(1)  # a deferred transaction holds no lock until it writes
    with for_writes(engine).begin(), pytest.raises(OperationalError, match="locked"):
        insert_without_waiting(2)

    assert for_writes(engine).pool is engine.pool
    engine.dispose()


def test_driver_query_answers_as_the_core_statement_does(engine: Engine) -> None:
    """The same Core statement, run on the driver: same rows, parameters bound by name even
    where one is used twice, and datetimes readable on both backends."""
    metadata.create_all(engine)
    at = datetime(2026, 11, 23, 2, 30, 15, 123456)
    with engine.begin() as connection:
        connection.execute(
            insert(moments),
            [{"id": n, "owner": f"o{n % 3}", "at": at + timedelta(minutes=n)} for n in range(9)],
        )
    statement = (
        select(moments.c.id, moments.c.at)
        .where(
            (moments.c.owner == bindparam("owner"))
            | (moments.c.id == func.length(bindparam("owner")) + bindparam("offset"))
        )
        .order_by(moments.c.id)
    )
    query = DriverQuery(engine, statement)
    with engine.connect() as connection:
        expected = connection.execute(statement, {"owner": "o1", "offset": 6}).all()
    with driver_cursor(engine) as cursor:
        rows = query.rows(cursor, owner="o1", offset=6)
        assert query.rows(cursor, owner="nobody", offset=100) == []
    assert [n for n, _ in rows] == [n for n, _ in expected] == [1, 4, 7, 8]
    assert [driver_datetime(value).replace(tzinfo=None) for _, value in rows] == [
        at + timedelta(minutes=n) for n in (1, 4, 7, 8)
    ]


def test_driver_cursor_sees_what_was_committed_after_it_was_last_used(engine: Engine) -> None:
    """Pooled driver connections hold no snapshot between uses: a later read sees new rows."""
    metadata.create_all(engine)
    query = DriverQuery(engine, select(func.count()).select_from(counter))
    with driver_cursor(engine) as cursor:
        assert query.rows(cursor) == [(0,)]
    with engine.begin() as connection:
        connection.execute(insert(counter), [{"n": 1}, {"n": 2}])
    with driver_cursor(engine) as cursor:
        assert query.rows(cursor) == [(2,)]
