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
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import registry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal, _TraverseInternalsType
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import Field, SQLModel
from steward.events.v1 import events_pb2
from steward.identity.v1 import identity_pb2

from services.common.db import for_writes, is_postgres
from services.common.identifiers import IdentifierType
from services.common.outbox import Outbox, outbox_tables
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


class Person(IdentityTable, table=True):
    __tablename__ = "persons"
    person_id: str = Field(primary_key=True, max_length=40)
    root_id: str = Field(index=True, max_length=40)
    alias_of: str | None = Field(default=None, max_length=40)
    merged_by: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class IdentifierRow(IdentityTable, table=True):
    __tablename__ = "identifiers"
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    digest: str = Field(unique=True, max_length=96)
    type: int
    namespace: str = Field(default="", max_length=64)
    person_id: str = Field(index=True, max_length=40)
    quarantined: bool = False
    first_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    last_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class IdentifierSource(IdentityTable, table=True):
    __tablename__ = "identifier_sources"
    identifier_id: int = Field(primary_key=True)
    source: str = Field(primary_key=True, max_length=64)


class Copresence(IdentityTable, table=True):
    __tablename__ = "copresence"
    identifier_id: int = Field(primary_key=True)
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
    identifier_id: int = Field(primary_key=True)
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


def utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back naive; everything stored is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class _ValueList(TypeDecorator[Sequence[Any]]):
    """A list bound as one parameter: a JSON array on SQLite, an array on PostgreSQL."""

    impl = String
    cache_ok = True

    def __init__(self, element_type: type[TypeEngine[Any]]) -> None:
        super().__init__()
        self.element_type = element_type

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(self.element_type))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Sequence[Any] | None, dialect: Dialect) -> Any:
        values = list(value or ())
        return json.dumps(values) if dialect.name == "sqlite" else values


class values_in(ColumnElement[bool]):
    """``column IN (the list bound as parameter name)``, the whole list one parameter.

    The statement text stays the same whatever the list's length, so a statement built once is
    compiled and prepared once, and no list needs chunking below a bound-parameter limit:
    ``IN (SELECT value FROM json_each(?))`` on SQLite, ``= ANY(?)`` on PostgreSQL.
    """

    inherit_cache = True
    _is_implicitly_boolean = True
    _traverse_internals: _TraverseInternalsType = [  # noqa: RUF012 - as SQLAlchemy declares it
        ("column", InternalTraversal.dp_clauseelement),
        ("values", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.type = Boolean()
        self.column = column
        self.values = bindparam(name, type_=_ValueList(type(column.type)))


@compiles(values_in)
def _values_in_json_each(element: values_in, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"


@compiles(values_in, "postgresql")
def _values_in_any(element: values_in, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} = ANY({values})"


# Statements of the Resolve path, built once (parameters are named after no column, as UPDATE
# ... SET reserves the column names for itself).
_KNOWN: Final = (
    select(
        identifiers.c.id,
        identifiers.c.digest,
        identifiers.c.type,
        identifiers.c.namespace,
        identifiers.c.person_id,
        identifiers.c.quarantined,
        persons.c.root_id,
        sources_table.c.source,
    )
    .select_from(
        identifiers.join(persons, persons.c.person_id == identifiers.c.person_id).outerjoin(
            sources_table, sources_table.c.identifier_id == identifiers.c.id
        )
    )
    .where(values_in(identifiers.c.digest, "digests"))
)
_GROUPS: Final = (
    select(
        persons.c.root_id,
        persons.c.person_id,
        # Only the root's creation matters; parsing every member's costs per row on SQLite.
        case((persons.c.person_id == persons.c.root_id, persons.c.created_at)),
        identifiers.c.id,
        identifiers.c.digest,
        identifiers.c.type,
        identifiers.c.namespace,
        sources_table.c.source,
    )
    .select_from(
        persons.outerjoin(identifiers, identifiers.c.person_id == persons.c.person_id).outerjoin(
            sources_table, sources_table.c.identifier_id == identifiers.c.id
        )
    )
    .where(values_in(persons.c.root_id, "roots"))
)
_COPRESENCE: Final = select(
    copresence_table.c.identifier_id, copresence_table.c.other_person_id
).where(values_in(copresence_table.c.identifier_id, "ids"))
_IDS_OF_DIGESTS: Final = select(identifiers.c.digest, identifiers.c.id).where(
    values_in(identifiers.c.digest, "digests")
)
_TOUCH_ALL: Final = (
    update(identifiers)
    .where(values_in(identifiers.c.id, "ids"), identifiers.c.last_seen < bindparam("stale"))
    .values(last_seen=bindparam("seen_at"))
)
_TOUCH_ONE: Final = (
    update(identifiers)
    .where(
        identifiers.c.id == bindparam("identifier_id"), identifiers.c.last_seen < bindparam("stale")
    )
    .values(last_seen=bindparam("seen_at"))
)
_TOUCH_STATEMENTS: Final = 8
_ATTACH: Final = (
    update(persons)
    .where(persons.c.person_id == bindparam("absorbed"))
    .values(alias_of=bindparam("attach_to"), merged_by=bindparam("by_merge"))
)
_REROOT: Final = (
    update(persons)
    .where(persons.c.root_id == bindparam("absorbed"))
    .values(root_id=bindparam("survivor"))
)


class IdentityStore:
    """Opens graph transactions on the identity database."""

    def __init__(self, engine: Engine, outbox: Outbox | None = None) -> None:
        self.engine = engine
        self.outbox = outbox or Outbox(PRODUCER, OUTBOX_TABLES)

    @contextmanager
    def writing(self) -> Iterator[GraphStore]:
        """A transaction holding the graph's write lock; followers are woken after commit."""
        with for_writes(self.engine).begin() as connection:
            if is_postgres(connection):
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield GraphStore(connection, self.outbox)
        self.outbox.notify()

    @contextmanager
    def reading(self) -> Iterator[GraphStore]:
        with self.engine.connect() as connection:
            yield GraphStore(connection, self.outbox)

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

    # Reads ---------------------------------------------------------------------------------------

    def known_with_roots(
        self, digests: Iterable[str]
    ) -> tuple[dict[str, KnownIdentifier], dict[str, str]]:
        """The identifiers among ``digests`` in the graph, and the roots of their persons."""
        known: dict[str, KnownIdentifier] = {}
        roots: dict[str, str] = {}
        rows = self.connection.execute(_KNOWN, {"digests": list(set(digests))})
        for identifier_id, digest, type_, namespace, origin, hub, root, source in rows:
            found = known.get(digest)
            if found is None:
                found = known[digest] = KnownIdentifier(
                    identifier_id, digest, type_, namespace, origin, bool(hub), set()
                )
                roots[origin] = root
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
                    identifiers.c.person_id,
                    identifiers.c.quarantined,
                ).where(identifiers.c.digest.in_(chunk))
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
        wanted = sorted(set(persons_))
        return {
            row.person_id: row.root_id
            for row in self._select_in(persons, persons.c.person_id, wanted)
        }

    def groups(self, roots: Iterable[str]) -> dict[str, PersonGroup]:
        result: dict[str, PersonGroup] = {}
        held: dict[int, tuple[str, str, IdentifierType, str, set[str]]] = {}
        rows = self.connection.execute(_GROUPS, {"roots": list(set(roots))})
        for root, person, created_at, identifier_id, digest, type_, namespace, source in rows:
            group = result.get(root)
            if group is None:
                group = result[root] = PersonGroup(root, _NEVER, set(), {})
            if created_at is not None:
                group.created_at = utc(created_at)
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
            for identifier_id, other in self.connection.execute(_COPRESENCE, {"ids": wanted}):
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
        if new_persons:
            self.connection.execute(
                insert(persons),
                [
                    {
                        "person_id": p,
                        "root_id": p,
                        "alias_of": None,
                        "merged_by": None,
                        "created_at": at,
                    }
                    for p, at in new_persons
                ],
            )

    def link_identifiers(self, new: Sequence[NewIdentifier]) -> dict[str, int]:
        if not new:
            return {}
        self.connection.execute(
            insert(identifiers),
            [
                {
                    "digest": n.digest,
                    "type": int(n.type),
                    "namespace": n.namespace,
                    "person_id": n.origin,
                    "quarantined": False,
                    "first_seen": n.seen_at,
                    "last_seen": n.seen_at,
                }
                for n in new
            ],
        )
        # (Cheaper than INSERT ... RETURNING, which SQLAlchemy renders anew for every batch.)
        ids = self._identifier_ids([n.digest for n in new])
        self.connection.execute(
            insert(sources_table),
            [{"identifier_id": ids[n.digest], "source": n.source} for n in new],
        )
        return ids

    def touch_identifiers(self, seen: dict[int, tuple[datetime, set[str]]]) -> None:
        if not seen:
            return
        # Items mostly carry no time of their own, so a batch has one or a few: one statement
        # per time costs far less than one row per identifier.
        by_time: dict[datetime, list[int]] = defaultdict(list)
        for identifier_id, (at, _) in seen.items():
            by_time[at].append(identifier_id)
        if len(by_time) <= _TOUCH_STATEMENTS:
            for at, ids in by_time.items():
                self.connection.execute(
                    _TOUCH_ALL, {"ids": ids, "seen_at": at, "stale": at - LAST_SEEN_RESOLUTION}
                )
        else:
            self.connection.execute(
                _TOUCH_ONE,
                [
                    {"identifier_id": i, "seen_at": at, "stale": at - LAST_SEEN_RESOLUTION}
                    for i, (at, _) in seen.items()
                ],
            )
        new_sources = [
            {"identifier_id": i, "source": s} for i, (_, sources) in seen.items() for s in sources
        ]
        if new_sources:
            self.connection.execute(insert(sources_table), new_sources)

    def relink_digest(self, identifier_id: int, new_digest: str) -> None:
        self.connection.execute(
            update(identifiers).where(identifiers.c.id == identifier_id).values(digest=new_digest)
        )

    def record_copresence(self, observations: set[tuple[int, str]], at: datetime) -> None:
        if observations:
            self.connection.execute(
                insert(copresence_table),
                [
                    {"identifier_id": i, "other_person_id": p, "observed_at": at}
                    for i, p in sorted(observations)
                ],
            )

    def quarantine(self, identifier_id: int) -> KnownIdentifier:
        self.connection.execute(
            update(identifiers).where(identifiers.c.id == identifier_id).values(quarantined=True)
        )
        row = self.connection.execute(
            select(identifiers).where(identifiers.c.id == identifier_id)
        ).one()
        return KnownIdentifier(
            row.id, row.digest, row.type, row.namespace, row.person_id, True, set()
        )

    def apply_merges(self, applied: Sequence[MergeRecord]) -> None:
        """Apply merges in order, each statement once for all of them; record and publish them."""
        if not applied:
            return
        absorbed = [(merge, person) for merge in applied for person in merge.absorbed]
        self.connection.execute(
            _ATTACH,
            [
                {
                    "absorbed": person,
                    "attach_to": merge.attach_point(person),
                    "by_merge": merge.merge_id,
                }
                for merge, person in absorbed
            ],
        )
        # In order: a later merge may absorb an earlier one's survivor.
        self.connection.execute(
            _REROOT,
            [{"absorbed": person, "survivor": merge.survivor} for merge, person in absorbed],
        )
        self.connection.execute(
            insert(merges),
            [
                {
                    "merge_id": merge.merge_id,
                    "survivor_id": merge.survivor,
                    "absorbed": list(merge.absorbed),
                    "actor": merge.actor,
                    "source": merge.source,
                    "reason": merge.reason,
                    "rules_version": merge.rules_version,
                    "merged_at": merge.merged_at,
                    "undone_at": None,
                }
                for merge in applied
            ],
        )
        digests = {e.digest for merge in applied for e in merge.evidence}
        ids = self._identifier_ids(list(digests)) if digests else {}
        evidence = [
            {"merge_id": merge.merge_id, "identifier_id": identifier_id, "side_person_id": side}
            for merge in applied
            for identifier_id, side in {
                ids[e.digest]: e.side for e in merge.evidence if e.digest in ids
            }.items()
        ]
        if evidence:
            self.connection.execute(insert(evidence_table), evidence)
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

    def _identifier_ids(self, digests: Sequence[str]) -> dict[str, int]:
        rows = self.connection.execute(_IDS_OF_DIGESTS, {"digests": sorted(set(digests))})
        return {digest: identifier_id for digest, identifier_id in rows}

    def undo_merge(self, merge: MergeRecord, at: datetime, actor: str, reason: str) -> list[str]:
        restored = list(merge.absorbed)
        self.connection.execute(
            update(persons)
            .where(persons.c.person_id.in_(restored), persons.c.merged_by == merge.merge_id)
            .values(alias_of=None, merged_by=None)
        )
        # Recompute roots of everything that resolved through the survivor's current root.
        current_root = self.connection.execute(
            select(persons.c.root_id).where(persons.c.person_id == merge.survivor)
        ).scalar_one()
        rows = self.connection.execute(
            select(persons.c.person_id, persons.c.alias_of).where(persons.c.root_id == current_root)
        ).all()
        alias_of = {row.person_id: row.alias_of for row in rows}

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
            if root != current_root:
                for chunk in _chunks(members):
                    self.connection.execute(
                        update(persons).where(persons.c.person_id.in_(chunk)).values(root_id=root)
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
        rows: list[dict[str, Any]] = []
        links: list[dict[str, str]] = []
        for entry in entries:
            entry_id = new_record_id("h")
            rows.append(
                {
                    "id": entry_id,
                    "kind": int(entry.kind),
                    "at": entry.at,
                    "actor": entry.actor,
                    "source": entry.source,
                    "rules_version": entry.rules_version,
                    "reason": entry.reason,
                    "merge_id": entry.merge_id,
                    "evidence": [[int(t), d] for t, d in entry.evidence],
                }
            )
            links.extend(
                {"history_id": entry_id, "person_id": p} for p in dict.fromkeys(entry.person_ids)
            )
        self.connection.execute(insert(history), rows)
        if links:
            self.connection.execute(insert(history_persons), links)

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
        root = row.root_id
        members = self.connection.execute(select(persons).where(persons.c.root_id == root)).all()
        created_at = next(utc(m.created_at) for m in members if m.person_id == root)
        aliases = sorted(m.person_id for m in members if m.person_id != root)
        rows = list(
            self._select_in(identifiers, identifiers.c.person_id, [m.person_id for m in members])
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
            select(persons.c.root_id).where(persons.c.person_id == person_id)
        ).scalar_one_or_none()
        members = [person_id]
        if root is not None:
            members = list(
                self.connection.execute(
                    select(persons.c.person_id).where(persons.c.root_id == root)
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
        root = self.connection.execute(
            select(persons.c.root_id).where(persons.c.person_id == person_id)
        ).scalar_one_or_none()
        if root is None:
            return None
        members = list(
            self.connection.execute(
                select(persons.c.person_id).where(persons.c.root_id == root)
            ).scalars()
        )
        ids = list(
            self.connection.execute(
                select(identifiers.c.id).where(identifiers.c.person_id.in_(members))
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
