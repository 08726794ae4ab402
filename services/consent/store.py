"""The consent service's tables and the queries on them.

The ledger table is append-only: UPDATE and DELETE on it are refused by the database itself
(triggers created by the migration, on SQLite and PostgreSQL). Appends are serialised by the
``consent_ledger_head`` row, which also holds the last chain hash, so seqs are gap-free and each
chain hash follows the one before it. Decisions are kept twice: as ledger entries (forever, under
the person's ledger subject) and in ``consent_decisions`` (by person id, for answering quickly;
deleted at erasure).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    LargeBinary,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import registry
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel

from services.common.bulk import BulkInsert
from services.common.consumer import consumer_tables
from services.common.db import (
    DriverQuery,
    driver_cursor,
    driver_datetime,
    for_writes,
    is_postgres,
    is_sqlite,
)
from services.common.outbox import Outbox, outbox_tables
from services.common.person_links import PersonLinks, person_links_table
from services.common.sqlite_writer import SqliteWriter
from services.common.times import utc
from services.consent import ledger
from services.consent.check_cache import ConsentCheckCache
from services.consent.decisions import DecisionRecord
from services.consent.purposes import PurposeDefinition

PRODUCER: Final = "consent"
LEDGER_TABLE: Final = "consent_ledger"


class ConsentTable(SQLModel, registry=registry()):
    """Base of the consent service's tables: their own metadata, apart from other services."""


class PurposeRow(ConsentTable, table=True):
    __tablename__ = "consent_purposes"
    id: str = Field(primary_key=True, max_length=64)
    revision: int = Field(primary_key=True)
    legal_basis: int
    description: str = Field(max_length=2000)
    policy_version: str = Field(max_length=64)
    notice_sha256: str = Field(max_length=64)
    default_lifetime_seconds: int = Field(sa_column=Column(BigInteger, nullable=False))
    retention_days: int
    allowed_fields: list[str] = Field(sa_column=Column(JSON, nullable=False))
    gpc_withdraws: bool
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class LedgerRow(ConsentTable, table=True):
    __tablename__ = LEDGER_TABLE
    __table_args__ = (Index("ix_consent_ledger_subject", "subject"),)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    recorded_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    kind: int
    subject: str = Field(default="", max_length=40)
    purpose: str = Field(default="", max_length=64)
    decision: int = 0
    source: int = 0
    policy_version: str = Field(default="", max_length=64)
    notice_sha256: str = Field(default="", max_length=64)
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    actor: str = Field(default="", max_length=128)
    occurred_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    details: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    canonical: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    chain_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class LedgerHeadRow(ConsentTable, table=True):
    __tablename__ = "consent_ledger_head"
    id: int = Field(primary_key=True)
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    last_chain_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class CheckpointRow(ConsentTable, table=True):
    __tablename__ = "consent_checkpoints"
    tree_size: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    chain_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    timestamp: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    key_id: str = Field(max_length=64)
    signed_bytes: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class DecisionRow(ConsentTable, table=True):
    __tablename__ = "consent_decisions"
    __table_args__ = (Index("ix_consent_decisions_person_purpose", "person_id", "purpose"),)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    person_id: str = Field(max_length=40)
    purpose: str = Field(max_length=64)
    decision: int
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    source: int
    policy_version: str = Field(max_length=64)
    signal: str = Field(default="", max_length=16)
    gpc_conflict_acknowledged: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )


class EventRow(ConsentTable, table=True):
    """A collected behaviour event, minimised to what its purposes may keep."""

    __tablename__ = "consent_events"
    __table_args__ = (
        Index("ix_consent_events_person", "person_id"),
        Index("ix_consent_events_retain_until", "retain_until"),
    )
    event_id: str = Field(primary_key=True, max_length=128)
    person_id: str = Field(max_length=40)
    type: int
    item_id: str = Field(default="", max_length=128)
    category: str = Field(default="", max_length=256)
    value: float = 0.0
    dwell_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    quantity: int = 0
    currency: str = Field(default="", max_length=3)
    channel: str = Field(default="", max_length=32)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    retain_until: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    purposes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    attributes: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    query_ciphertext: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    """Search text, AES-256-GCM under the person's data key (in the key store)."""


class ErasedRow(ConsentTable, table=True):
    """Persons erased, by keyed hash only: events naming them are dropped as ERASED."""

    __tablename__ = "consent_erased"
    person_digest: str = Field(primary_key=True, max_length=96)
    erased_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ErasureRow(ConsentTable, table=True):
    """An erasure request and each service's part in it."""

    __tablename__ = "consent_erasures"
    erasure_id: str = Field(primary_key=True, max_length=40)
    person_id: str | None = Field(default=None, max_length=40)
    """Kept only while the erasure is under way, then cleared."""
    reason: str = Field(default="", max_length=1024)
    state: int
    requested_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    completed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    services: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    tombstone_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class WithdrawalRow(ConsentTable, table=True):
    """A withdrawal followed to the consumers of consent's log until each has applied it.

    Kept by person id only until the person is erased; the ledger keeps the lasting record
    (the withdrawal and, once every consumer has acknowledged, its "propagated" entry).
    """

    __tablename__ = "consent_withdrawals"
    ledger_seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    """The ledger entry of the decision (or signal) that withdrew the purpose."""
    envelope_seq: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    """The ConsentChanged envelope on consent's log; a consumer that acknowledged it applied it."""
    person_id: str = Field(max_length=40, index=True)
    purpose: str = Field(max_length=64)
    subject: str = Field(max_length=128)
    """The withdrawal's ledger subject, which the "propagated" entry repeats."""
    withdrawn_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    acknowledgements: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    """Consumer name to when it acknowledged the envelope (ISO 8601, UTC)."""
    propagated_seq: int | None = Field(default=None, sa_column=Column(BigInteger, index=True))
    """The ledger entry that says every consumer has applied it; unset until then."""


target_metadata = ConsentTable.metadata
OUTBOX_TABLES: Final = outbox_tables(target_metadata, prefix="consent_")
CONSUMER_TABLES: Final = consumer_tables(target_metadata, prefix="consent_")

purposes_table = PurposeRow.__table__  # type: ignore[attr-defined]
ledger_table = LedgerRow.__table__  # type: ignore[attr-defined]
head_table = LedgerHeadRow.__table__  # type: ignore[attr-defined]
checkpoints_table = CheckpointRow.__table__  # type: ignore[attr-defined]
decisions_table = DecisionRow.__table__  # type: ignore[attr-defined]
events_table = EventRow.__table__  # type: ignore[attr-defined]
erased_table = ErasedRow.__table__  # type: ignore[attr-defined]
erasures_table = ErasureRow.__table__  # type: ignore[attr-defined]
withdrawals_table = WithdrawalRow.__table__  # type: ignore[attr-defined]
_CHECKS_CHANGED: Final = "steward.consent.checks_changed"
"""``Connection.info`` key: the persons a :meth:`ConsentStore.writing` transaction changes."""
PERSON_LINKS: Final = PersonLinks(person_links_table(target_metadata, prefix="consent_"))
"""Persons identity merged: a person's consent is decided by its whole group's decisions, the
newest winning, as one person's would be (see services/common/person_links.py)."""


def person_group(connection: Connection, person: str) -> list[str]:
    """Every person merged with ``person`` (itself included), the group's root first."""
    return PERSON_LINKS.group(connection, person)


def person_groups(connection: Connection, persons: Iterable[str]) -> dict[str, list[str]]:
    """``person_group`` of each of ``persons`` merged with anyone; the others are left out."""
    return PERSON_LINKS.groups(connection, persons)


# The queries of CheckConsent, built once: building a select per call and computing its cache
# key cost more than running it (decisions_of on SQLite: 138 -> 70 us with its connection).
_DECISIONS_OF: Final = (
    select(decisions_table)
    .where(decisions_table.c.person_id.in_(PERSON_LINKS.group_members(bindparam("person_id"))))
    .order_by(decisions_table.c.seq)
)
"""The decisions of a person and of everyone identity merged with it, in one statement."""
_ERASED_DIGEST: Final = select(erased_table.c.person_digest).where(
    erased_table.c.person_digest == bindparam("digest")
)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)


@dataclass(frozen=True, slots=True)
class AppendedEntry:
    """A ledger entry as written."""

    record: ledger.LedgerRecord
    canonical: bytes
    leaf_hash: bytes
    chain_hash: bytes


class ConsentStore:
    """Transactions and queries on the consent database."""

    def __init__(self, engine: Engine, outbox: Outbox | None = None) -> None:
        self.engine = engine
        self.outbox = outbox or Outbox(PRODUCER, OUTBOX_TABLES)
        self.checks = ConsentCheckCache()
        """What CheckConsent reads, kept between calls (see services/consent/check_cache.py)."""
        self._check_decisions = DriverQuery(engine, _CHECK_DECISIONS)
        self._erased_digest = DriverQuery(engine, _ERASED_DIGEST)
        # SQLite has one writer at a time and makes the others poll (sleeping up to 100 ms
        # between tries): this process's write transactions queue on one writer connection
        # instead, whose WAL checkpoints run off the commit (an in-memory database has a
        # single connection anyway).
        self._writer = (
            SqliteWriter(engine)
            if is_sqlite(engine) and not isinstance(engine.pool, StaticPool)
            else None
        )

    def close(self) -> None:
        """Stop the SQLite writer's checkpoints and close its connection (the engine is the
        caller's)."""
        if self._writer is not None:
            self._writer.dispose()

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A write transaction; event-log followers are woken after it commits.

        On SQLite it runs on the writer connection (never nest two). Afterwards CheckConsent's
        cache (:attr:`checks`) forgets what the transaction may have changed: everything, unless
        it said less with :meth:`changes_checks_of`.
        """
        changed: set[str] | None = None
        writer = self._writer
        try:
            with (
                writer.lock if writer is not None else nullcontext(),
                for_writes(
                    writer.engine if writer is not None else self.engine
                ).begin() as connection,
            ):
                connection.info.pop(_CHECKS_CHANGED, None)  # left by a failed transaction
                yield connection
                changed = connection.info.pop(_CHECKS_CHANGED, None)
        finally:
            if changed is None or changed:  # an empty set: nobody's checks changed
                self.checks.changed(changed)
        if writer is not None:
            writer.committed()
        self.outbox.notify()

    @staticmethod
    def changes_checks_of(connection: Connection, persons: Iterable[str]) -> None:
        """Say that this :meth:`writing` transaction changes what only ``persons`` (perhaps
        none) check their consent against: the cache keeps everyone else's."""
        connection.info.setdefault(_CHECKS_CHANGED, set()).update(persons)

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection

    # Purposes ------------------------------------------------------------------------------------

    def current_purposes(self, connection: Connection) -> dict[str, PurposeDefinition]:
        latest = (
            select(purposes_table.c.id, func.max(purposes_table.c.revision).label("revision"))
            .group_by(purposes_table.c.id)
            .subquery()
        )
        rows = connection.execute(
            select(purposes_table).join(
                latest,
                (purposes_table.c.id == latest.c.id)
                & (purposes_table.c.revision == latest.c.revision),
            )
        )
        return {row.id: _purpose(row) for row in rows}

    def save_purpose(self, connection: Connection, purpose: PurposeDefinition) -> PurposeDefinition:
        current = connection.execute(
            select(func.max(purposes_table.c.revision)).where(purposes_table.c.id == purpose.id)
        ).scalar()
        revision = int(current or 0) + 1
        connection.execute(
            insert(purposes_table).values(
                id=purpose.id,
                revision=revision,
                legal_basis=int(purpose.legal_basis),
                description=purpose.description,
                policy_version=purpose.policy_version,
                notice_sha256=purpose.notice_sha256,
                default_lifetime_seconds=int(purpose.default_lifetime.total_seconds()),
                retention_days=purpose.retention_days,
                allowed_fields=list(purpose.allowed_fields),
                gpc_withdraws=purpose.gpc_withdraws,
                updated_at=purpose.updated_at,
            )
        )
        return PurposeDefinition(
            purpose.id,
            purpose.legal_basis,
            purpose.description,
            purpose.policy_version,
            purpose.notice_sha256,
            purpose.default_lifetime,
            purpose.retention_days,
            purpose.allowed_fields,
            purpose.gpc_withdraws,
            revision,
            purpose.updated_at,
        )

    # Ledger --------------------------------------------------------------------------------------

    def append_ledger(
        self, connection: Connection, records: Sequence[ledger.LedgerRecord]
    ) -> list[AppendedEntry]:
        """Append entries (their ``seq`` is assigned here), within the caller's transaction."""
        if not records:
            return []
        head = connection.execute(
            select(head_table).where(head_table.c.id == 1).with_for_update()
            if is_postgres(connection)
            else select(head_table).where(head_table.c.id == 1)
        ).first()
        if head is None:
            connection.execute(
                insert(head_table).values(id=1, last_seq=0, last_chain_hash=ledger.GENESIS)
            )
            last_seq, chain = 0, ledger.GENESIS
            if is_postgres(connection):
                connection.execute(select(head_table).where(head_table.c.id == 1).with_for_update())
        else:
            last_seq, chain = int(head.last_seq), bytes(head.last_chain_hash)
        appended: list[AppendedEntry] = []
        rows: list[dict[str, Any]] = []
        for offset, record in enumerate(records, start=1):
            record = _with_seq(record, last_seq + offset)
            canonical = ledger.canonical_bytes(record)
            leaf = ledger.leaf_hash(canonical)
            chain = ledger.chain_hash(chain, leaf)
            appended.append(AppendedEntry(record, canonical, leaf, chain))
            rows.append(
                {
                    "seq": record.seq,
                    "recorded_at": record.recorded_at,
                    "kind": int(record.kind),
                    "subject": record.subject,
                    "purpose": record.purpose,
                    "decision": int(record.decision),
                    "source": int(record.source),
                    "policy_version": record.policy_version,
                    "notice_sha256": record.notice_sha256,
                    "expires_at": record.expires_at,
                    "actor": record.actor,
                    "occurred_at": record.occurred_at,
                    "details": dict(record.details),
                    "canonical": canonical,
                    "leaf_hash": leaf,
                    "chain_hash": chain,
                }
            )
        connection.execute(insert(ledger_table), rows)
        connection.execute(
            update(head_table)
            .where(head_table.c.id == 1)
            .values(last_seq=appended[-1].record.seq, last_chain_hash=appended[-1].chain_hash)
        )
        return appended

    def ledger_size(self, connection: Connection) -> int:
        return int(
            connection.execute(select(func.coalesce(func.max(ledger_table.c.seq), 0))).scalar_one()
        )

    def leaf_hashes(self, connection: Connection, after_seq: int) -> list[bytes]:
        rows = connection.execute(
            select(ledger_table.c.leaf_hash)
            .where(ledger_table.c.seq > after_seq)
            .order_by(ledger_table.c.seq)
        )
        return [bytes(row[0]) for row in rows]

    def chain_hash_at(self, connection: Connection, seq: int) -> bytes:
        if seq == 0:
            return ledger.GENESIS
        value = connection.execute(
            select(ledger_table.c.chain_hash).where(ledger_table.c.seq == seq)
        ).scalar_one()
        return bytes(value)

    def entries(
        self, connection: Connection, from_seq: int, to_seq: int, limit: int = 1000
    ) -> list[Any]:
        return list(
            connection.execute(
                select(ledger_table)
                .where(ledger_table.c.seq >= from_seq, ledger_table.c.seq <= to_seq)
                .order_by(ledger_table.c.seq)
                .limit(limit)
            )
        )

    def entry(self, connection: Connection, seq: int) -> Any:
        return connection.execute(select(ledger_table).where(ledger_table.c.seq == seq)).first()

    # Checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, connection: Connection, checkpoint: ledger.SignedCheckpoint) -> None:
        connection.execute(
            insert(checkpoints_table).values(
                tree_size=checkpoint.tree_size,
                root_hash=checkpoint.root,
                chain_hash=checkpoint.chain_hash,
                timestamp=checkpoint.timestamp,
                key_id=checkpoint.key_id,
                signed_bytes=checkpoint.signed_bytes,
                signature=checkpoint.signature,
            )
        )

    def checkpoint(
        self, connection: Connection, tree_size: int = 0
    ) -> ledger.SignedCheckpoint | None:
        """The checkpoint of ``tree_size``, or the newest when 0."""
        query = select(checkpoints_table)
        query = (
            query.where(checkpoints_table.c.tree_size == tree_size)
            if tree_size
            else query.order_by(checkpoints_table.c.tree_size.desc()).limit(1)
        )
        row = connection.execute(query).first()
        return None if row is None else _checkpoint(row)

    def checkpoints(self, connection: Connection, up_to: int) -> list[ledger.SignedCheckpoint]:
        rows = connection.execute(
            select(checkpoints_table)
            .where(checkpoints_table.c.tree_size <= up_to)
            .order_by(checkpoints_table.c.tree_size)
        )
        return [_checkpoint(row) for row in rows]

    # Decisions -----------------------------------------------------------------------------------

    def save_decisions(
        self, connection: Connection, decisions: Sequence[tuple[DecisionRecord, bool]]
    ) -> None:
        """Store decisions with whether each acknowledged a GPC conflict."""
        if decisions:
            connection.execute(
                insert(decisions_table),
                [
                    {
                        "seq": d.seq,
                        "person_id": d.person_id,
                        "purpose": d.purpose,
                        "decision": int(d.decision),
                        "occurred_at": d.occurred_at,
                        "expires_at": d.expires_at,
                        "source": int(d.source),
                        "policy_version": d.policy_version,
                        "signal": d.signal,
                        "gpc_conflict_acknowledged": acknowledged,
                    }
                    for d, acknowledged in decisions
                ],
            )

    def decisions_of(self, connection: Connection, person_id: str) -> list[DecisionRecord]:
        """The decisions deciding the person's consent: its own and those of every person
        identity merged with it (``person_group``), in ledger order."""
        return [
            _decision(row) for row in connection.execute(_DECISIONS_OF, {"person_id": person_id})
        ]

    def check_decisions(self, person_id: str) -> list[DecisionRecord]:
        """The decisions of ``person_id``'s group, every purpose, in ledger order: what
        CheckConsent reads. Run on the driver (:class:`DriverQuery`): the SQLAlchemy layers
        around this one point read cost more than the read."""
        with driver_cursor(self.engine) as cursor:
            rows = self._check_decisions.rows(cursor, person_id=person_id)
        return list(_decision_records(rows))

    def erased_among(self, digests: Sequence[str]) -> bool:
        """Whether any of ``digests`` (a person's erasure markers) is recorded, on the driver."""
        with driver_cursor(self.engine) as cursor:
            return any(self._erased_digest.rows(cursor, digest=digest) for digest in digests)


def _with_seq(record: ledger.LedgerRecord, seq: int) -> ledger.LedgerRecord:
    from dataclasses import replace

    return replace(record, seq=seq)


def _purpose(row: Any) -> PurposeDefinition:
    return PurposeDefinition(
        id=row.id,
        legal_basis=row.legal_basis,
        description=row.description,
        policy_version=row.policy_version,
        notice_sha256=row.notice_sha256,
        default_lifetime=timedelta(seconds=row.default_lifetime_seconds),
        retention_days=row.retention_days,
        allowed_fields=tuple(row.allowed_fields),
        gpc_withdraws=bool(row.gpc_withdraws),
        revision=row.revision,
        updated_at=utc(row.updated_at),
    )


def _checkpoint(row: Any) -> ledger.SignedCheckpoint:
    return ledger.SignedCheckpoint(
        tree_size=row.tree_size,
        root=bytes(row.root_hash),
        timestamp=utc(row.timestamp),
        key_id=row.key_id,
        signed_bytes=bytes(row.signed_bytes),
        signature=bytes(row.signature),
        chain_hash=bytes(row.chain_hash),
    )


# The queries of Collect, built once: a select built per batch, and its cache key, cost more
# than sending the IN list it carries.
_EXISTING_EVENT_IDS: Final = select(events_table.c.event_id).where(
    events_table.c.event_id.in_(bindparam("event_ids", expanding=True))
)
_ERASED_AMONG: Final = select(erased_table.c.person_digest).where(
    erased_table.c.person_digest.in_(bindparam("digests", expanding=True))
)
_ERASED_COUNT: Final = select(func.count()).select_from(erased_table)
_ALL_ERASED: Final = select(erased_table.c.person_digest)
_DECISION_COLUMNS: Final = (
    decisions_table.c.seq,
    decisions_table.c.person_id,
    decisions_table.c.purpose,
    decisions_table.c.decision,
    decisions_table.c.occurred_at,
    decisions_table.c.expires_at,
    decisions_table.c.source,
    decisions_table.c.policy_version,
    decisions_table.c.signal,
)
_CHECK_DECISIONS: Final = _DECISIONS_OF.with_only_columns(*_DECISION_COLUMNS)
_DECISIONS_OF_MANY: Final = (
    select(*_DECISION_COLUMNS)
    .where(decisions_table.c.person_id.in_(bindparam("person_ids", expanding=True)))
    .order_by(decisions_table.c.seq)
)
_DECISIONS_AFTER: Final = (
    select(*_DECISION_COLUMNS)
    .where(decisions_table.c.seq > bindparam("after"))
    .order_by(decisions_table.c.seq)
    .limit(bindparam("limit"))
)
_LAST_DECISION_SEQ: Final = select(func.coalesce(func.max(decisions_table.c.seq), 0))
EVENT_COLUMNS: Final = (
    "event_id",
    "person_id",
    "type",
    "item_id",
    "category",
    "value",
    "dwell_ms",
    "quantity",
    "currency",
    "channel",
    "occurred_at",
    "received_at",
    "retain_until",
    "purposes",
    "attributes",
    "query_ciphertext",
)
"""The order of an event row's values, as ``insert_events`` takes them."""
_INSERT_EVENTS: Final = BulkInsert(events_table, EVENT_COLUMNS)


def _decision_records(rows: Iterable[Any]) -> Iterator[DecisionRecord]:
    """Rows of ``_DECISION_COLUMNS`` as records (unpacked: Collect reads thousands at a time),
    from SQLAlchemy or straight from the driver (SQLite's datetimes as text)."""
    for seq, person, purpose, decision, occurred, expires, source, policy, signal in rows:
        yield DecisionRecord(
            seq,
            person,
            purpose,
            decision,
            utc(driver_datetime(occurred)),
            None if expires is None else utc(driver_datetime(expires)),
            source,
            policy,
            signal,
        )


class CollectionStore:
    """Queries on collected events and erasures (the consent database)."""

    def __init__(self, store: ConsentStore) -> None:
        self.store = store

    @staticmethod
    def _in_chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
        for start in range(0, len(values), 900):
            yield values[start : start + 900]

    def existing_event_ids(self, connection: Connection, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in self._in_chunks(list(event_ids)):
            found.update(
                connection.execute(_EXISTING_EVENT_IDS, {"event_ids": list(chunk)}).scalars()
            )
        return found

    def erased(self, connection: Connection, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in self._in_chunks(list(digests)):
            found.update(connection.execute(_ERASED_AMONG, {"digests": list(chunk)}).scalars())
        return found

    def erased_count(self, connection: Connection) -> int:
        """How many erasure markers there are (rows are only ever added)."""
        return int(connection.execute(_ERASED_COUNT).scalar_one())

    def all_erased(self, connection: Connection) -> set[str]:
        return set(connection.execute(_ALL_ERASED).scalars())

    def decisions_of_many(
        self, connection: Connection, person_ids: Sequence[str]
    ) -> dict[str, list[DecisionRecord]]:
        found: dict[str, list[DecisionRecord]] = {}
        for chunk in self._in_chunks(sorted(set(person_ids))):
            rows = connection.execute(_DECISIONS_OF_MANY, {"person_ids": list(chunk)})
            for record in _decision_records(rows):
                found.setdefault(record.person_id, []).append(record)
        return found

    def decisions_after(self, connection: Connection, seq: int, limit: int) -> list[DecisionRecord]:
        """Up to ``limit`` decisions recorded after ledger ``seq``, in ledger order."""
        rows = connection.execute(_DECISIONS_AFTER, {"after": seq, "limit": limit})
        return list(_decision_records(rows))

    def last_decision_seq(self, connection: Connection) -> int:
        return int(connection.execute(_LAST_DECISION_SEQ).scalar_one())

    def insert_events(self, connection: Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Store collected events: tuples of values in ``EVENT_COLUMNS`` order."""
        _INSERT_EVENTS.execute(connection, rows)

    def events_of(self, connection: Connection, person_ids: Sequence[str]) -> list[Any]:
        rows: list[Any] = []
        for chunk in self._in_chunks(list(person_ids)):
            rows.extend(
                connection.execute(
                    select(events_table)
                    .where(events_table.c.person_id.in_(chunk))
                    .order_by(events_table.c.occurred_at, events_table.c.event_id)
                )
            )
        return rows

    def delete_person_data(
        self, connection: Connection, person_ids: Sequence[str]
    ) -> tuple[int, int]:
        """Delete the persons' events, decisions and followed withdrawals; returns (events,
        decisions) deleted. Their merge links go when identity's PersonForgotten arrives."""
        events = decisions = 0
        for chunk in self._in_chunks(list(person_ids)):
            connection.execute(
                delete(withdrawals_table).where(withdrawals_table.c.person_id.in_(chunk))
            )
            events += (
                connection.execute(
                    delete(events_table).where(events_table.c.person_id.in_(chunk))
                ).rowcount
                or 0
            )
            decisions += (
                connection.execute(
                    delete(decisions_table).where(decisions_table.c.person_id.in_(chunk))
                ).rowcount
                or 0
            )
        return events, decisions

    def mark_erased(self, connection: Connection, digests: Sequence[str], at: datetime) -> None:
        known = self.erased(connection, digests)
        fresh = [
            {"person_digest": d, "erased_at": at} for d in dict.fromkeys(digests) if d not in known
        ]
        if fresh:
            connection.execute(insert(erased_table), fresh)

    def sweep(self, connection: Connection, now: datetime) -> dict[str, int]:
        """Delete events past their retention; returns how many, by event type."""
        rows = connection.execute(
            select(events_table.c.type, func.count())
            .where(events_table.c.retain_until < now)
            .group_by(events_table.c.type)
        ).all()
        connection.execute(delete(events_table).where(events_table.c.retain_until < now))
        return {str(row[0]): int(row[1]) for row in rows}

    # Erasures ------------------------------------------------------------------------------------

    def save_erasure(self, connection: Connection, values: dict[str, Any]) -> None:
        connection.execute(insert(erasures_table).values(**values))

    def update_erasure(
        self, connection: Connection, erasure_id: str, values: dict[str, Any]
    ) -> None:
        connection.execute(
            update(erasures_table).where(erasures_table.c.erasure_id == erasure_id).values(**values)
        )

    def erasure(self, connection: Connection, erasure_id: str) -> Any:
        return connection.execute(
            select(erasures_table).where(erasures_table.c.erasure_id == erasure_id)
        ).first()

    def open_erasures(self, connection: Connection) -> list[Any]:
        """Erasures not yet complete (few: each completes once every service has done its part)."""
        return list(
            connection.execute(
                select(erasures_table).where(erasures_table.c.completed_at.is_(None))
            )
        )

    def open_erasure_of(self, connection: Connection, person_id: str) -> Any:
        return connection.execute(
            select(erasures_table).where(
                erasures_table.c.person_id == person_id, erasures_table.c.completed_at.is_(None)
            )
        ).first()


class WithdrawalStore:
    """Queries on the withdrawals followed to consent's consumers."""

    @staticmethod
    def save(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            connection.execute(insert(withdrawals_table), list(rows))

    @staticmethod
    def unpropagated_up_to(connection: Connection, envelope_seq: int) -> list[Any]:
        """Withdrawals not yet propagated whose envelope is at or before ``envelope_seq``."""
        return list(
            connection.execute(
                select(withdrawals_table)
                .where(
                    withdrawals_table.c.propagated_seq.is_(None),
                    withdrawals_table.c.envelope_seq <= envelope_seq,
                )
                .order_by(withdrawals_table.c.envelope_seq)
            )
        )

    @staticmethod
    def update(connection: Connection, ledger_seq: int, values: dict[str, Any]) -> None:
        connection.execute(
            update(withdrawals_table)
            .where(withdrawals_table.c.ledger_seq == ledger_seq)
            .values(**values)
        )

    @staticmethod
    def of_entries(connection: Connection, ledger_seqs: Sequence[int]) -> dict[int, Any]:
        """The withdrawals recorded by these ledger entries, by ledger seq."""
        if not ledger_seqs:
            return {}
        rows = connection.execute(
            select(withdrawals_table).where(withdrawals_table.c.ledger_seq.in_(list(ledger_seqs)))
        )
        return {row.ledger_seq: row for row in rows}


def _decision(row: Any) -> DecisionRecord:
    return DecisionRecord(
        seq=row.seq,
        person_id=row.person_id,
        purpose=row.purpose,
        decision=row.decision,
        occurred_at=utc(row.occurred_at),
        expires_at=_utc_or_none(row.expires_at),
        source=row.source,
        policy_version=row.policy_version,
        signal=row.signal,
    )
