"""The identity service's tables and the queries on them.

Only keyed hashes of identifiers are stored (``kid:hexdigest``), never raw values. Every change
to the graph runs in one transaction holding the graph's write lock (``BEGIN IMMEDIATE`` on
SQLite, a transaction-scoped advisory lock on PostgreSQL), so concurrent Resolve calls can
neither lose a merge nor create two persons for one identifier. The event-log outbox lives in
the same database, so a merge and its PersonsMerged envelope commit together.
"""

from __future__ import annotations

import itertools
import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import registry
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel
from steward.events.v1 import events_pb2
from steward.identity.v1 import identity_pb2

from services.common.db import for_writes, is_postgres
from services.common.identifiers import IdentifierType
from services.common.outbox import Outbox, outbox_tables
from services.common.sqlite_writer import SqliteWriter
from services.common.times import utc
from services.identity.graph import (
    Evidence,
    HistoryRecord,
    KnownIdentifier,
    MergeRecord,
    NewIdentifier,
    PersonGroup,
    new_record_id,
)
from services.identity.rules import MergeRules, rules_document, rules_from_document

PRODUCER: Final = "identity"
_log = logging.getLogger(__name__)
_LOCK_KEY: Final = zlib.crc32(b"steward.identity.graph")
_CHUNK: Final = 900
"""Rows per IN (...) list: below SQLite's default limit on bound parameters."""
LAST_SEEN_RESOLUTION: Final = timedelta(hours=1)
"""``last_seen`` moves only when it is older than this: an identifier seen again and again (a
cookie on every page) would otherwise rewrite its row on every Resolve."""
_NEVER: Final = datetime.min.replace(tzinfo=UTC)
"""Creation time of a group whose root row is missing (it never is, but the type wants one)."""


class IdentityTable(SQLModel, registry=registry()):
    """Base of the identity service's tables: their own metadata, apart from other services."""


_BIG_KEY: Final = BigInteger().with_variant(Integer, "sqlite")
"""A 64-bit key, SQLite's INTEGER PRIMARY KEY (the rowid) there."""


class Person(IdentityTable, table=True):
    """A person: ``person_id`` is its random public id, ``key`` the internal one.

    Identifiers and roots refer to persons by ``key``, which grows with every new person, so a
    new person or identifier appends to those indexes instead of dirtying a random page of each
    (a page written to the WAL and checkpointed back for every few rows on SQLite).
    """

    __tablename__ = "persons"
    key: int | None = Field(
        default=None, sa_column=Column(_BIG_KEY, primary_key=True, autoincrement=True)
    )
    person_id: str = Field(unique=True, max_length=40)
    root_key: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    """``key`` of the person this one resolves to (its own while it is no alias)."""
    alias_of: str | None = Field(default=None, max_length=40)
    merged_by: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class IdentifierRow(IdentityTable, table=True):
    __tablename__ = "identifiers"
    id: int | None = Field(
        default=None, sa_column=Column(_BIG_KEY, primary_key=True, autoincrement=True)
    )
    digest: str = Field(unique=True, max_length=96)
    type: int
    namespace: str = Field(default="", max_length=64)
    person_key: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    """``persons.key`` of the person in whose name the identifier came (never changes)."""
    quarantined: bool = False
    first_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    last_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class IdentifierSource(IdentityTable, table=True):
    __tablename__ = "identifier_sources"
    identifier_id: int = Field(
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
        )
    )
    source: str = Field(primary_key=True, max_length=64)


class Copresence(IdentityTable, table=True):
    __tablename__ = "copresence"
    identifier_id: int = Field(
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
        )
    )
    other_person_id: str = Field(primary_key=True, max_length=40)
    observed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class MergeRow(IdentityTable, table=True):
    __tablename__ = "merges"
    merge_id: str = Field(primary_key=True, max_length=40)
    survivor_id: str = Field(max_length=40, index=True)
    absorbed: list[str] = Field(sa_column=Column(JSON, nullable=False))
    actor: str = Field(max_length=128)
    source: str = Field(max_length=64)
    reason: str = Field(max_length=1024)
    rules_version: int
    merged_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    undone_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class MergeEvidence(IdentityTable, table=True):
    __tablename__ = "merge_evidence"
    __table_args__ = (Index("ix_merge_evidence_identifier", "identifier_id"),)
    merge_id: str = Field(primary_key=True, max_length=40)
    identifier_id: int = Field(
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
        )
    )
    side_person_id: str = Field(max_length=40)


class HistoryRow(IdentityTable, table=True):
    __tablename__ = "history"
    id: str = Field(primary_key=True, max_length=40)
    kind: int
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    actor: str = Field(max_length=128)
    source: str = Field(max_length=64)
    rules_version: int
    reason: str = Field(max_length=1024)
    merge_id: str = Field(default="", max_length=40)
    evidence: list[list[Any]] = Field(sa_column=Column(JSON, nullable=False))
    """[[type, digest], ...] as they were when the entry was written."""


class HistoryPerson(IdentityTable, table=True):
    __tablename__ = "history_persons"
    history_id: str = Field(primary_key=True, max_length=40)
    person_id: str = Field(primary_key=True, max_length=40, index=True)


class RulesRow(IdentityTable, table=True):
    __tablename__ = "merge_rules"
    version: int = Field(primary_key=True)
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    actor: str = Field(max_length=128)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


target_metadata = IdentityTable.metadata
OUTBOX_TABLES: Final = outbox_tables(target_metadata, prefix="identity_")

persons = Person.__table__  # type: ignore[attr-defined]
identifiers = IdentifierRow.__table__  # type: ignore[attr-defined]
sources_table = IdentifierSource.__table__  # type: ignore[attr-defined]
copresence_table = Copresence.__table__  # type: ignore[attr-defined]
merges = MergeRow.__table__  # type: ignore[attr-defined]
evidence_table = MergeEvidence.__table__  # type: ignore[attr-defined]
history = HistoryRow.__table__  # type: ignore[attr-defined]
history_persons = HistoryPerson.__table__  # type: ignore[attr-defined]
rules_table = RulesRow.__table__  # type: ignore[attr-defined]


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


_TOUCH_STATEMENTS: Final = 8
_ROOT_PERSON: Final = persons.alias("root_person")


@lru_cache(maxsize=256)
def sqlite_time(moment: datetime) -> str:
    """A time as SQLAlchemy stores DateTime on SQLite: UTC, always with microseconds (the
    column is compared as text)."""
    m = moment.astimezone(UTC) if moment.tzinfo is not None else moment
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d} "
        f"{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}"
    )


def _parse_time(value: Any) -> datetime:
    return utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


class _DriverSql:
    """The Resolve path's statements in the driver's own SQL, for one dialect.

    Resolve runs them with the DBAPI cursor of the transaction's connection: through SQLAlchemy
    every row of an executemany had its parameters built and every datetime formatted in Python,
    a third of the statements' cost.
    """

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        self._column_types: dict[str, tuple[str, ...]] = {}

        def sql(statement: str) -> str:
            return statement.replace("?", "%s") if postgres else statement

        def among(column: str, type_: str = "text") -> str:
            if postgres:
                return f"{column} = ANY(?::{type_}[])"
            return f"{column} IN (SELECT value FROM json_each(?))"

        self.known = sql(
            "SELECT i.id, i.digest, i.type, i.namespace, o.person_id, i.quarantined, r.person_id,"
            " s.source, o.key, r.key FROM identifiers i JOIN persons o ON o.key = i.person_key"
            " JOIN persons r ON r.key = o.root_key"
            " LEFT JOIN identifier_sources s ON s.identifier_id = i.id"
            f" WHERE {among('i.digest')}"
        )
        # Only the root's creation matters; parsing every member's costs per row.
        self.groups = sql(
            "SELECT r.person_id, p.person_id, CASE WHEN p.key = r.key THEN p.created_at END,"
            " i.id, i.digest, i.type, i.namespace, s.source, p.key, r.key"
            " FROM persons r JOIN persons p ON p.root_key = r.key"
            " LEFT JOIN identifiers i ON i.person_key = p.key"
            " LEFT JOIN identifier_sources s ON s.identifier_id = i.id"
            f" WHERE {among('r.person_id')}"
        )
        self.person_keys = sql(f"SELECT person_id, key FROM persons WHERE {among('person_id')}")
        # The graph's write lock is held, so on SQLite the keys it would pick can be known first.
        self.new_person_keys = (
            "SELECT nextval(pg_get_serial_sequence('persons', 'key')) FROM generate_series(1, %s)"
            if postgres
            else "SELECT max(key) FROM persons"
        )
        self.copresence = sql(
            "SELECT identifier_id, other_person_id FROM copresence"
            f" WHERE {among('identifier_id', 'bigint')}"
        )
        self.ids_of_digests = sql(f"SELECT digest, id FROM identifiers WHERE {among('digest')}")
        self.last_identifier_id = "SELECT max(id) FROM identifiers"
        self.insert_person = self._insert(
            "persons",
            ("key", "bigint"),
            ("person_id", "text"),
            ("root_key", "bigint"),
            ("created_at", "timestamptz"),
        )
        identifier_columns = (
            ("digest", "text"),
            ("type", "int"),
            ("namespace", "text"),
            ("person_key", "bigint"),
            ("quarantined", "boolean"),
            ("first_seen", "timestamptz"),
            ("last_seen", "timestamptz"),
        )
        # PostgreSQL hands the ids back; on SQLite they are chosen first (see link_identifiers).
        self.insert_identifiers = (
            self._insert("identifiers", *identifier_columns) + " RETURNING digest, id"
            if postgres
            else self._insert("identifiers", ("id", "bigint"), *identifier_columns)
        )
        self.insert_source = self._insert(
            "identifier_sources", ("identifier_id", "bigint"), ("source", "text")
        )
        self.touch_all = sql(
            f"UPDATE identifiers SET last_seen = ? WHERE {among('id', 'bigint')} AND last_seen < ?"
        )
        self.touch_one = sql("UPDATE identifiers SET last_seen = ? WHERE id = ? AND last_seen < ?")
        self.insert_copresence = self._insert(
            "copresence",
            ("identifier_id", "bigint"),
            ("other_person_id", "text"),
            ("observed_at", "timestamptz"),
        )
        self.attach = sql("UPDATE persons SET alias_of = ?, merged_by = ? WHERE person_id = ?")
        self.reroot = sql("UPDATE persons SET root_key = ? WHERE root_key = ?")
        self.insert_merge = self._insert(
            "merges",
            ("merge_id", "text"),
            ("survivor_id", "text"),
            ("absorbed", "json"),
            ("actor", "text"),
            ("source", "text"),
            ("reason", "text"),
            ("rules_version", "int"),
            ("merged_at", "timestamptz"),
        )
        self.insert_evidence = self._insert(
            "merge_evidence",
            ("merge_id", "text"),
            ("identifier_id", "bigint"),
            ("side_person_id", "text"),
        )
        self.insert_history = self._insert(
            "history",
            ("id", "text"),
            ("kind", "int"),
            ("at", "timestamptz"),
            ("actor", "text"),
            ("source", "text"),
            ("rules_version", "int"),
            ("reason", "text"),
            ("merge_id", "text"),
            ("evidence", "json"),
        )
        self.insert_history_persons = self._insert(
            "history_persons", ("history_id", "text"), ("person_id", "text")
        )

    def _insert(self, table: str, *columns: tuple[str, str]) -> str:
        """INSERT of many rows: run per row on SQLite, once over one array per column on
        PostgreSQL (``rows`` does either). JSON values are passed as their text."""
        names = ", ".join(name for name, _ in columns)
        if not self.postgres:
            return f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"
        self._column_types[table] = tuple(type_ for _, type_ in columns)
        arrays = ", ".join(f"%s::{'text' if type_ == 'json' else type_}[]" for _, type_ in columns)
        aliases = ", ".join(f"c{i}" for i in range(len(columns)))
        values = ", ".join(
            f"c{i}::json" if type_ == "json" else f"c{i}" for i, (_, type_) in enumerate(columns)
        )
        rows = f"unnest({arrays}) AS u({aliases})"
        return f"INSERT INTO {table} ({names}) SELECT {values} FROM {rows}"

    def rows(self, cursor: Any, statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Run an :meth:`_insert` statement for ``rows``."""
        if self.postgres:
            table = statement.split(" ", 3)[2]
            cursor.execute(
                statement,
                [
                    pg_array_literal(column, type_)
                    for column, type_ in zip(
                        zip(*rows, strict=True), self._column_types[table], strict=True
                    )
                ],
            )
        else:
            cursor.executemany(statement, rows)

    def values(self, values: Iterable[Any]) -> Any:
        """A list bound as one parameter: an array literal on PostgreSQL (``among`` casts it),
        JSON for json_each on SQLite."""
        listed = list(values)
        return pg_array_literal(listed, "text") if self.postgres else json.dumps(listed)

    def time(self, moment: datetime) -> Any:
        return moment if self.postgres else sqlite_time(moment)


def pg_array_literal(values: Sequence[Any], type_: str) -> str:
    """``values`` as the text of a PostgreSQL array, for a parameter cast to ``type_[]``.

    psycopg dumps a list element by element in Python: 0.9 µs per text, 2.8 µs per timestamp
    (measured here), a fifth of the identity server's time on a Resolve load. Joined as text the
    same column costs 0.04 µs per text element; a batch's timestamps are mostly one moment, so
    each distinct one is formatted once.
    """
    if type_ in ("int", "bigint"):
        return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"
    if type_ == "boolean":
        return "{" + ",".join("NULL" if v is None else ("t" if v else "f") for v in values) + "}"
    if type_ == "timestamptz":
        formatted: dict[datetime, str] = {}
        parts = []
        for moment in values:
            if moment is None:
                parts.append("NULL")
                continue
            text = formatted.get(moment)
            if text is None:
                text = formatted[moment] = '"' + utc(moment).isoformat() + '"'
            parts.append(text)
        return "{" + ",".join(parts) + "}"
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


_DRIVER_SQL: Final = {"sqlite": _DriverSql(postgres=False), "postgresql": _DriverSql(postgres=True)}


class IdentityStore:
    """Opens graph transactions on the identity database."""

    def __init__(
        self, engine: Engine, outbox: Outbox | None = None, *, consumers: Sequence[str] = ()
    ) -> None:
        self.engine = engine
        self.outbox = outbox or Outbox(PRODUCER, OUTBOX_TABLES)
        self.consumers = tuple(consumers)
        """The deployed consumers of identity's log, whose acknowledgements a forget awaits."""
        self._sqlite_writer: SqliteWriter | None = None
        if engine.dialect.name == "sqlite" and not isinstance(engine.pool, StaticPool):
            self._sqlite_writer = SqliteWriter(engine)

    def close(self) -> None:
        if self._sqlite_writer is not None:
            self._sqlite_writer.dispose()

    @contextmanager
    def writing(self) -> Iterator[GraphStore]:
        """A transaction holding the graph's write lock; followers are woken after commit."""
        writer = self._sqlite_writer
        if writer is None:
            with for_writes(self.engine).begin() as connection:
                if is_postgres(connection):
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY}
                    )
                yield GraphStore(connection, self.outbox)
        else:
            with writer.lock, for_writes(writer.engine).begin() as connection:
                yield GraphStore(connection, self.outbox)
            writer.committed()
        self.outbox.notify()

    @contextmanager
    def reading(self) -> Iterator[GraphStore]:
        with self.engine.connect() as connection:
            yield GraphStore(connection, self.outbox)

    def acknowledged(self, producer: str, consumer: str, seq: int) -> None:
        """A consumer's acknowledgement (the event log's callback): once every consumer has
        applied a PersonForgotten, the envelopes that named the person are redacted."""
        if consumer not in self.consumers:
            return
        with self.engine.connect() as connection:
            if not self.outbox.erasing_up_to(connection, seq):
                return
        self.settle_forgotten()

    def reconcile(self) -> None:
        """Settle from the stored acknowledgements, on a timer: what an acknowledgement's
        callback left undone (or another replica received) is not left waiting."""
        with self.engine.connect() as connection:
            acknowledged = self.outbox.acknowledgements(connection)
        floor = min(
            (acknowledged[c].seq if c in acknowledged else 0 for c in self.consumers), default=0
        )
        if self.consumers and floor > 0:
            self.acknowledged(PRODUCER, self.consumers[0], floor)

    def settle_forgotten(self) -> int:
        """Redact what forgotten persons left on the log, where every consumer has applied the
        forget (at once when none is deployed); returns how many envelopes were redacted."""
        with self.writing() as graph:
            return self.outbox.redact_settled(graph.connection, self.consumers)

    # Rules ---------------------------------------------------------------------------------------

    def rules(self, version: int = 0) -> MergeRules | None:
        with self.engine.connect() as connection:
            query = select(rules_table)
            query = (
                query.where(rules_table.c.version == version)
                if version
                else query.order_by(rules_table.c.version.desc()).limit(1)
            )
            row = connection.execute(query).first()
        if row is None:
            return None
        return rules_from_document(
            row.document, version=row.version, actor=row.actor, created_at=utc(row.created_at)
        )

    def put_rules(self, rules: MergeRules, actor: str, now: datetime) -> MergeRules:
        with for_writes(self.engine).begin() as connection:
            latest = connection.execute(select(func.max(rules_table.c.version))).scalar()
            version = int(latest or 0) + 1
            connection.execute(
                insert(rules_table).values(
                    version=version,
                    document=dict(rules_document(rules)),
                    actor=actor,
                    created_at=now,
                )
            )
        return rules_from_document(
            rules_document(rules), version=version, actor=actor, created_at=now
        )


class GraphStore:
    """The queries of one transaction; implements ``graph.GraphTransaction``."""

    def __init__(self, connection: Connection, outbox: Outbox) -> None:
        self.connection = connection
        self.outbox = outbox
        self._sql = _DRIVER_SQL[connection.dialect.name]
        self._keys: dict[str, int] = {}
        """person_id -> key of the persons this transaction has met (keys never change)."""
        self._ids: dict[str, int] = {}
        """digest -> id of the identifiers this transaction has met."""

    def _cursor(self) -> Any:
        """A DBAPI cursor on the transaction's own connection."""
        return self.connection.connection.cursor()

    # Reads ---------------------------------------------------------------------------------------

    def known_with_roots(
        self, digests: Iterable[str]
    ) -> tuple[dict[str, KnownIdentifier], dict[str, str]]:
        """The identifiers among ``digests`` in the graph, and the roots of their persons."""
        known: dict[str, KnownIdentifier] = {}
        roots: dict[str, str] = {}
        cursor = self._cursor()
        cursor.execute(self._sql.known, (self._sql.values(set(digests)),))
        keys = self._keys
        for row in cursor.fetchall():
            identifier_id, digest, type_, namespace, origin, hub, root, source = row[:8]
            found = known.get(digest)
            if found is None:
                found = known[digest] = KnownIdentifier(
                    identifier_id, digest, type_, namespace, origin, bool(hub), set()
                )
                roots[origin] = root
                keys[origin], keys[root] = row[8], row[9]
                self._ids[digest] = identifier_id
            if source is not None:
                found.sources.add(source)
        return known, roots

    def known_identifiers(self, digests: Iterable[str]) -> dict[str, KnownIdentifier]:
        wanted = sorted(set(digests))
        found: dict[str, KnownIdentifier] = {}
        for chunk in _chunks(wanted):
            rows = self.connection.execute(
                select(
                    identifiers.c.id,
                    identifiers.c.digest,
                    identifiers.c.type,
                    identifiers.c.namespace,
                    persons.c.person_id,
                    identifiers.c.quarantined,
                )
                .join(persons, persons.c.key == identifiers.c.person_key)
                .where(identifiers.c.digest.in_(chunk))
            )
            for row in rows:
                found[row.digest] = KnownIdentifier(
                    row.id,
                    row.digest,
                    row.type,
                    row.namespace,
                    row.person_id,
                    bool(row.quarantined),
                    set(),
                )
        if found:
            by_id = {known.id: known for known in found.values()}
            for source_row in self._select_in(
                sources_table, sources_table.c.identifier_id, list(by_id)
            ):
                by_id[source_row.identifier_id].sources.add(source_row.source)
        return found

    def _select_in(self, table: Any, column: Any, values: Sequence[Any]) -> Iterator[Any]:
        for chunk in _chunks(values):
            yield from self.connection.execute(select(table).where(column.in_(chunk)))

    def roots_of(self, persons_: Iterable[str]) -> dict[str, str]:
        roots: dict[str, str] = {}
        for chunk in _chunks(sorted(set(persons_))):
            rows = self.connection.execute(
                select(
                    persons.c.person_id,
                    persons.c.key,
                    _ROOT_PERSON.c.person_id,
                    _ROOT_PERSON.c.key,
                )
                .join(_ROOT_PERSON, _ROOT_PERSON.c.key == persons.c.root_key)
                .where(persons.c.person_id.in_(chunk))
            )
            for person, key, root, root_key in rows:
                roots[person] = root
                self._keys[person], self._keys[root] = key, root_key
        return roots

    def _person_keys(self, person_ids: Iterable[str]) -> dict[str, int]:
        """Keys of persons, those this transaction has not met yet read in one query."""
        keys = self._keys
        wanted = set(person_ids)
        missing = wanted - keys.keys()
        if missing:
            cursor = self._cursor()
            cursor.execute(self._sql.person_keys, (self._sql.values(missing),))
            keys.update(cursor.fetchall())
        return {person: keys[person] for person in wanted}

    def groups(self, roots: Iterable[str]) -> dict[str, PersonGroup]:
        result: dict[str, PersonGroup] = {}
        held: dict[int, tuple[str, str, IdentifierType, str, set[str]]] = {}
        cursor = self._cursor()
        cursor.execute(self._sql.groups, (self._sql.values(set(roots)),))
        keys = self._keys
        for row in cursor.fetchall():
            root, person, created_at, identifier_id, digest, type_, namespace, source = row[:8]
            keys[person], keys[root] = row[8], row[9]
            group = result.get(root)
            if group is None:
                group = result[root] = PersonGroup(root, _NEVER, set(), {})
            if created_at is not None and group.created_at is _NEVER:
                group.created_at = _parse_time(created_at)
            group.members.add(person)
            if identifier_id is None:
                continue
            entry = held.get(identifier_id)
            if entry is None:
                entry = held[identifier_id] = (root, digest, type_, namespace, set())
            if source is not None:
                entry[4].add(source)
        for root, digest, type_, namespace, sources in held.values():
            result[root].held[digest] = (type_, namespace, frozenset(sources))
        return result

    def copresence(self, identifier_ids: Iterable[int]) -> dict[int, set[str]]:
        observed: dict[int, set[str]] = {}
        wanted = list(set(identifier_ids))
        if wanted:
            cursor = self._cursor()
            cursor.execute(self._sql.copresence, (self._sql.values(wanted),))
            for identifier_id, other in cursor.fetchall():
                observed.setdefault(identifier_id, set()).add(other)
        return observed

    def quarantined_digests(self, digests: Iterable[str]) -> set[str]:
        wanted = sorted(set(digests))
        found: set[str] = set()
        for chunk in _chunks(wanted):
            found.update(
                self.connection.execute(
                    select(identifiers.c.digest).where(
                        identifiers.c.digest.in_(chunk), identifiers.c.quarantined.is_(True)
                    )
                ).scalars()
            )
        return found

    def merge(self, merge_id: str) -> MergeRecord | None:
        row = self.connection.execute(select(merges).where(merges.c.merge_id == merge_id)).first()
        return None if row is None else self._merge_record(row)

    def _merge_record(self, row: Any) -> MergeRecord:
        evidence = self.connection.execute(
            select(identifiers.c.digest, identifiers.c.type, evidence_table.c.side_person_id)
            .join(identifiers, identifiers.c.id == evidence_table.c.identifier_id)
            .where(evidence_table.c.merge_id == row.merge_id)
        )
        return MergeRecord(
            merge_id=row.merge_id,
            survivor=row.survivor_id,
            absorbed=tuple(row.absorbed),
            actor=row.actor,
            source=row.source,
            reason=row.reason,
            rules_version=row.rules_version,
            merged_at=utc(row.merged_at),
            evidence=tuple(Evidence(e.digest, e.type, e.side_person_id) for e in evidence),
            undone_at=None if row.undone_at is None else utc(row.undone_at),
        )

    def merges_supported_by(self, identifier_id: int) -> list[MergeRecord]:
        rows = self.connection.execute(
            select(merges)
            .join(evidence_table, evidence_table.c.merge_id == merges.c.merge_id)
            .where(evidence_table.c.identifier_id == identifier_id, merges.c.undone_at.is_(None))
            .order_by(merges.c.merged_at.desc())
        )
        return [self._merge_record(row) for row in rows]

    # Writes --------------------------------------------------------------------------------------

    def create_persons(self, new_persons: Sequence[tuple[str, datetime]]) -> None:
        if not new_persons:
            return
        sql, cursor = self._sql, self._cursor()
        if sql.postgres:
            cursor.execute(sql.new_person_keys, (len(new_persons),))
            keys = [key for (key,) in cursor.fetchall()]
        else:
            cursor.execute(sql.new_person_keys)
            first = int(cursor.fetchone()[0] or 0) + 1
            keys = list(range(first, first + len(new_persons)))
        time = sql.time
        sql.rows(
            cursor,
            sql.insert_person,
            [(key, p, key, time(at)) for key, (p, at) in zip(keys, new_persons, strict=True)],
        )
        self._keys.update((p, key) for key, (p, _) in zip(keys, new_persons, strict=True))

    def link_identifiers(self, new: Sequence[NewIdentifier]) -> dict[str, int]:
        if not new:
            return {}
        keys = self._person_keys({n.origin for n in new})
        sql, cursor = self._sql, self._cursor()
        time = sql.time
        if sql.postgres:
            sql.rows(
                cursor,
                sql.insert_identifiers,
                [
                    (
                        n.digest,
                        int(n.type),
                        n.namespace,
                        keys[n.origin],
                        False,
                        n.seen_at,
                        n.seen_at,
                    )
                    for n in new
                ],
            )
            ids = dict(cursor.fetchall())
        else:
            # The graph's write lock is held, so the ids SQLite would pick can be known first.
            cursor.execute(sql.last_identifier_id)
            first = int(cursor.fetchone()[0] or 0) + 1
            ids = {n.digest: identifier_id for identifier_id, n in enumerate(new, first)}
            sql.rows(
                cursor,
                sql.insert_identifiers,
                [
                    (
                        identifier_id,
                        n.digest,
                        int(n.type),
                        n.namespace,
                        keys[n.origin],
                        False,
                        time(n.seen_at),
                        time(n.seen_at),
                    )
                    for identifier_id, n in enumerate(new, first)
                ],
            )
        sql.rows(cursor, sql.insert_source, [(ids[n.digest], n.source) for n in new])
        self._ids.update(ids)
        return ids

    def touch_identifiers(self, seen: dict[int, tuple[datetime, set[str]]]) -> None:
        if not seen:
            return
        sql, cursor = self._sql, self._cursor()
        time = sql.time
        # Items mostly carry no time of their own, so a batch has one or a few: one statement
        # per time costs far less than one row per identifier.
        by_time: dict[datetime, list[int]] = defaultdict(list)
        for identifier_id, (at, _) in seen.items():
            by_time[at].append(identifier_id)
        if len(by_time) <= _TOUCH_STATEMENTS:
            for at, ids in by_time.items():
                cursor.execute(
                    sql.touch_all, (time(at), sql.values(ids), time(at - LAST_SEEN_RESOLUTION))
                )
        else:
            cursor.executemany(
                sql.touch_one,
                [(time(at), i, time(at - LAST_SEEN_RESOLUTION)) for i, (at, _) in seen.items()],
            )
        new_sources = [(i, s) for i, (_, sources) in seen.items() for s in sources]
        if new_sources:
            sql.rows(cursor, sql.insert_source, new_sources)

    def relink_digest(self, identifier_id: int, new_digest: str) -> None:
        self.connection.execute(
            update(identifiers).where(identifiers.c.id == identifier_id).values(digest=new_digest)
        )
        self._ids = {d: i for d, i in self._ids.items() if i != identifier_id}
        self._ids[new_digest] = identifier_id

    def record_copresence(self, observations: set[tuple[int, str]], at: datetime) -> None:
        if observations:
            observed_at = self._sql.time(at)
            self._sql.rows(
                self._cursor(),
                self._sql.insert_copresence,
                [(i, p, observed_at) for i, p in sorted(observations)],
            )

    def quarantine(self, identifier_id: int) -> KnownIdentifier:
        self.connection.execute(
            update(identifiers).where(identifiers.c.id == identifier_id).values(quarantined=True)
        )
        row = self.connection.execute(
            select(identifiers, persons.c.person_id)
            .join(persons, persons.c.key == identifiers.c.person_key)
            .where(identifiers.c.id == identifier_id)
        ).one()
        return KnownIdentifier(
            row.id, row.digest, row.type, row.namespace, row.person_id, True, set()
        )

    def apply_merges(self, applied: Sequence[MergeRecord]) -> None:
        """Apply merges in order, each statement once for all of them; record and publish them."""
        if not applied:
            return
        sql, cursor = self._sql, self._cursor()
        absorbed = [(merge, person) for merge in applied for person in merge.absorbed]
        cursor.executemany(
            sql.attach,
            [(merge.attach_point(person), merge.merge_id, person) for merge, person in absorbed],
        )
        # In order: a later merge may absorb an earlier one's survivor.
        keys = self._person_keys(
            person for merge in applied for person in (merge.survivor, *merge.absorbed)
        )
        cursor.executemany(
            sql.reroot, [(keys[merge.survivor], keys[person]) for merge, person in absorbed]
        )
        sql.rows(
            cursor,
            sql.insert_merge,
            [
                (
                    merge.merge_id,
                    merge.survivor,
                    json.dumps(list(merge.absorbed)),
                    merge.actor,
                    merge.source,
                    merge.reason,
                    merge.rules_version,
                    sql.time(merge.merged_at),
                )
                for merge in applied
            ],
        )
        ids = self._identifier_ids([e.digest for merge in applied for e in merge.evidence])
        evidence = [
            (merge.merge_id, identifier_id, side)
            for merge in applied
            for identifier_id, side in {
                ids[e.digest]: e.side for e in merge.evidence if e.digest in ids
            }.items()
        ]
        if evidence:
            sql.rows(cursor, sql.insert_evidence, evidence)
        self.add_history(
            [
                HistoryRecord(
                    kind=identity_pb2.HISTORY_KIND_MERGE,
                    at=merge.merged_at,
                    actor=merge.actor,
                    source=merge.source,
                    person_ids=(merge.survivor, *merge.absorbed),
                    evidence=tuple((e.type, e.digest) for e in merge.evidence),
                    rules_version=merge.rules_version,
                    reason=merge.reason,
                    merge_id=merge.merge_id,
                )
                for merge in applied
            ]
        )
        for merged_at, same_time in itertools.groupby(applied, key=lambda m: m.merged_at):
            self.outbox.append(
                self.connection,
                [
                    events_pb2.PersonsMerged(
                        merge_id=merge.merge_id,
                        surviving_person_id=merge.survivor,
                        absorbed_person_ids=list(merge.absorbed),
                        reason=merge.reason,
                    )
                    for merge in same_time
                ],
                occurred_at=merged_at,
            )

    def _identifier_ids(self, digests: Iterable[str]) -> dict[str, int]:
        """Ids of the identifiers among ``digests``, those this transaction has not met read."""
        wanted = set(digests)
        missing = wanted - self._ids.keys()
        if missing:
            cursor = self._cursor()
            cursor.execute(self._sql.ids_of_digests, (self._sql.values(sorted(missing)),))
            self._ids.update(cursor.fetchall())
        return {digest: self._ids[digest] for digest in wanted if digest in self._ids}

    def undo_merge(self, merge: MergeRecord, at: datetime, actor: str, reason: str) -> list[str]:
        restored = list(merge.absorbed)
        self.connection.execute(
            update(persons)
            .where(persons.c.person_id.in_(restored), persons.c.merged_by == merge.merge_id)
            .values(alias_of=None, merged_by=None)
        )
        # Recompute roots of everything that resolved through the survivor's current root.
        current_root = self.connection.execute(
            select(persons.c.root_key).where(persons.c.person_id == merge.survivor)
        ).scalar_one()
        rows = self.connection.execute(
            select(persons.c.person_id, persons.c.key, persons.c.alias_of).where(
                persons.c.root_key == current_root
            )
        ).all()
        alias_of = {row.person_id: row.alias_of for row in rows}
        key_of = {row.person_id: row.key for row in rows}

        def root_of(person: str) -> str:
            seen = set()
            while alias_of.get(person) and person not in seen:
                seen.add(person)
                person = alias_of[person]  # type: ignore[assignment]
            return person

        by_root: dict[str, list[str]] = defaultdict(list)
        for person in alias_of:
            by_root[root_of(person)].append(person)
        for root, members in by_root.items():
            if key_of[root] != current_root:
                for chunk in _chunks([key_of[member] for member in members]):
                    self.connection.execute(
                        update(persons)
                        .where(persons.c.key.in_(chunk))
                        .values(root_key=key_of[root])
                    )
        self.connection.execute(
            update(merges).where(merges.c.merge_id == merge.merge_id).values(undone_at=at)
        )
        self.outbox.append(
            self.connection,
            [
                events_pb2.PersonUnmerged(
                    merge_id=merge.merge_id,
                    surviving_person_id=merge.survivor,
                    restored_person_id=person,
                )
                for person in restored
            ],
            occurred_at=at,
        )
        return restored

    def add_history(self, entries: Sequence[HistoryRecord]) -> None:
        if not entries:
            return
        sql, cursor = self._sql, self._cursor()
        rows: list[tuple[Any, ...]] = []
        links: list[tuple[str, str]] = []
        for entry in entries:
            entry_id = new_record_id("h")
            evidence = json.dumps([[int(t), d] for t, d in entry.evidence])
            rows.append(
                (
                    entry_id,
                    int(entry.kind),
                    sql.time(entry.at),
                    entry.actor,
                    entry.source,
                    entry.rules_version,
                    entry.reason,
                    entry.merge_id,
                    evidence,
                )
            )
            links.extend((entry_id, p) for p in dict.fromkeys(entry.person_ids))
        sql.rows(cursor, sql.insert_history, rows)
        if links:
            sql.rows(cursor, sql.insert_history_persons, links)

    # Persons -------------------------------------------------------------------------------------

    def person_view(
        self, person_id: str
    ) -> tuple[str, datetime, list[str], list[Any], dict[int, list[str]]] | None:
        """(root, created_at, aliases, identifier rows, sources by identifier id) of a person."""
        row = self.connection.execute(
            select(persons).where(persons.c.person_id == person_id)
        ).first()
        if row is None:
            return None
        members = self.connection.execute(
            select(persons).where(persons.c.root_key == row.root_key)
        ).all()
        root_row = next(m for m in members if m.key == row.root_key)
        root, created_at = root_row.person_id, utc(root_row.created_at)
        aliases = sorted(m.person_id for m in members if m.person_id != root)
        rows = list(
            self._select_in(identifiers, identifiers.c.person_key, [m.key for m in members])
        )
        by_id: dict[int, list[str]] = defaultdict(list)
        for source_row in self._select_in(
            sources_table, sources_table.c.identifier_id, [r.id for r in rows]
        ):
            by_id[source_row.identifier_id].append(source_row.source)
        return root, created_at, aliases, rows, by_id

    def history_page(
        self, person_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> list[Any]:
        """History of a person and everyone who resolves to the same root, newest first."""
        root = self.connection.execute(
            select(persons.c.root_key).where(persons.c.person_id == person_id)
        ).scalar_one_or_none()
        members = [person_id]
        if root is not None:
            members = list(
                self.connection.execute(
                    select(persons.c.person_id).where(persons.c.root_key == root)
                ).scalars()
            )
        query = (
            select(history)
            .where(
                history.c.id.in_(
                    select(history_persons.c.history_id).where(
                        history_persons.c.person_id.in_(members)
                    )
                )
            )
            .order_by(history.c.at.desc(), history.c.id.desc())
            .limit(limit)
        )
        if after is not None:
            at, entry_id = after
            query = query.where(
                or_(history.c.at < at, and_(history.c.at == at, history.c.id < entry_id))
            )
        entries = self.connection.execute(query).all()
        if not entries:
            return []
        people: dict[str, list[str]] = defaultdict(list)
        for link in self._select_in(
            history_persons, history_persons.c.history_id, [e.id for e in entries]
        ):
            people[link.history_id].append(link.person_id)
        return [(entry, sorted(people[entry.id])) for entry in entries]

    def forget(self, person_id: str, reason: str) -> tuple[str, list[str], int] | None:
        """Delete a person, its aliases and their identifiers; returns (root, aliases, count)."""
        root_key = self.connection.execute(
            select(persons.c.root_key).where(persons.c.person_id == person_id)
        ).scalar_one_or_none()
        if root_key is None:
            return None
        rows = self.connection.execute(
            select(persons.c.person_id, persons.c.key).where(persons.c.root_key == root_key)
        ).all()
        members = [row.person_id for row in rows]
        root = next(row.person_id for row in rows if row.key == root_key)
        ids = list(
            self.connection.execute(
                select(identifiers.c.id).where(
                    identifiers.c.person_key.in_([row.key for row in rows])
                )
            ).scalars()
        )
        for chunk in _chunks(ids):
            self.connection.execute(
                delete(sources_table).where(sources_table.c.identifier_id.in_(chunk))
            )
            self.connection.execute(
                delete(copresence_table).where(copresence_table.c.identifier_id.in_(chunk))
            )
            self.connection.execute(
                delete(evidence_table).where(evidence_table.c.identifier_id.in_(chunk))
            )
            self.connection.execute(delete(identifiers).where(identifiers.c.id.in_(chunk)))
        self.connection.execute(
            delete(copresence_table).where(copresence_table.c.other_person_id.in_(members))
        )
        merge_ids = list(
            self.connection.execute(
                select(merges.c.merge_id).where(merges.c.survivor_id.in_(members))
            ).scalars()
        )
        for chunk in _chunks(merge_ids):
            self.connection.execute(
                delete(evidence_table).where(evidence_table.c.merge_id.in_(chunk))
            )
            self.connection.execute(delete(merges).where(merges.c.merge_id.in_(chunk)))
        history_ids = list(
            self.connection.execute(
                select(history_persons.c.history_id).where(history_persons.c.person_id.in_(members))
            ).scalars()
        )
        for chunk in _chunks(history_ids):
            self.connection.execute(
                delete(history_persons).where(history_persons.c.history_id.in_(chunk))
            )
            self.connection.execute(delete(history).where(history.c.id.in_(chunk)))
        self.connection.execute(delete(persons).where(persons.c.person_id.in_(members)))
        aliases = sorted(m for m in members if m != root)
        self.outbox.append(
            self.connection,
            [events_pb2.PersonForgotten(person_id=root, alias_person_ids=aliases, reason=reason)],
        )
        return root, aliases, len(ids)
