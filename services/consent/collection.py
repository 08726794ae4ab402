"""Use cases of consented collection: Collect, erasure, data-subject access, retention sweep."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2
from steward.events.v1 import events_pb2

from services.common.errors import NotFound
from services.common.identifiers import PseudonymisedIdentifier
from services.common.keyring import Keyring, decrypt_field, encrypt_field
from services.common.times import utc
from services.consent import ledger
from services.consent.collect import (
    ConsentTimeline,
    DropReason,
    EventFields,
    invalid_reason,
    kept_fields,
    minimise,
    retain_until,
)
from services.consent.purposes import PurposeDefinition
from services.consent.service import ConsentService
from services.consent.store import CollectionStore, person_groups
from services.consent.timelines import ConsentTimelines

logger = logging.getLogger(__name__)
C = consent_pb2
A = audit_pb2

Resolver = Callable[[Sequence[Sequence[PseudonymisedIdentifier]], Sequence[str]], list[str]]
"""Resolves identifier sets (with their sources) to person ids, "" for refused sets."""

_ERASED_CONTEXT = b"steward-erased-person\x00"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NO_ATTRIBUTES: Final[dict[str, str]] = {}
"""The attributes of every event row that has none: one object, stored as JSON once a batch
(BulkInsert processes each distinct object once). Never changed."""


@dataclass(slots=True)
class CollectInput:
    """One event of a Collect batch, its subject already checked at the edge.

    Not frozen, but never changed once made (one an event: see EventFields).
    """

    index: int
    fields: EventFields
    person_id: str = ""
    identifiers: tuple[PseudonymisedIdentifier, ...] = ()
    invalid: str = ""


@dataclass(slots=True)
class CollectResult:
    index: int
    event_id: str
    accepted: bool = False
    drop_reason: DropReason = C.DROP_REASON_UNSPECIFIED
    detail: str = ""
    person_id: str = ""
    purposes: tuple[str, ...] = ()
    channel: str = ""


@dataclass(frozen=True, slots=True)
class ErasureView:
    erasure_id: str
    person_id: str
    state: int
    requested_at: datetime
    completed_at: datetime | None
    services: dict[str, dict[str, Any]]
    tombstone_seq: int


@dataclass(frozen=True, slots=True)
class SubjectData:
    person_id: str
    history: list[Any]
    events: list[dict[str, Any]] = field(default_factory=list)


class _ErasedPersons:
    """Which persons of a batch were erased, from the erasure markers held in memory.

    Markers are only ever added, so while their number stays the same the set held is the set
    in the database; a new count reloads it, and with none at all nobody's markers need
    hashing. Past ``HELD`` markers each batch looks its persons' markers up instead.
    """

    HELD: Final = 10_000

    def __init__(self, store: CollectionStore, markers_of: Callable[[str], list[str]]) -> None:
        self._store = store
        self._markers_of = markers_of
        self._held: tuple[int, frozenset[str]] = (0, frozenset())

    def among(self, connection: Connection, persons: Sequence[str]) -> set[str]:
        count = self._store.erased_count(connection)
        if not count:
            return set()
        markers = {person: self._markers_of(person) for person in persons}
        found: AbstractSet[str]
        if count > self.HELD:
            found = self._store.erased(connection, [m for ms in markers.values() for m in ms])
        else:
            held_count, found = self._held
            if held_count != count:
                found = frozenset(self._store.all_erased(connection))
                self._held = (len(found), found)
        return {person for person, ms in markers.items() if not found.isdisjoint(ms)}


def _event_stamp(moment: datetime) -> Timestamp:
    """``Timestamp.FromDatetime`` of an aware datetime by arithmetic: a quarter of its cost."""
    since = moment - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


class CollectionService:
    """Collect, erase, export and sweep, over the consent store and key store."""

    def __init__(self, consent: ConsentService, keyring: Keyring) -> None:
        self.consent = consent
        self.store = CollectionStore(consent.store)
        self.keyring = keyring
        self.timelines = ConsentTimelines(self.store)
        self._erased = _ErasedPersons(self.store, self.erased_digests)
        self._purposes: tuple[tuple[PurposeDefinition, ...], int] = ((), 0)
        """The purposes as of the last batch, and their generation (for ConsentTimeline)."""
        self._purposes_lock = threading.Lock()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """Collect's write transaction: it changes no consent decision, so CheckConsent's
        cache keeps everyone."""
        with self.consent.store.writing() as connection:
            self.consent.store.changes_checks_of(connection, ())  # events and outbox only
            yield connection

    def erased_digests(self, person_id: str) -> list[str]:
        """Keyed hashes that mark an erased person (one per HMAC key, for rotation)."""
        return self.keyring.candidate_digests(_ERASED_CONTEXT + person_id.encode())

    def is_erased(self, person_id: str) -> bool:
        with self.consent.store.reading() as connection:
            return bool(self.store.erased(connection, self.erased_digests(person_id)))

    # Collect -------------------------------------------------------------------------------------

    def collect(self, events: Sequence[CollectInput], resolve: Resolver) -> list[CollectResult]:
        now = self.consent.clock()
        results = [
            CollectResult(e.index, e.fields.event_id, channel=e.fields.channel) for e in events
        ]
        live: list[int] = []
        seen_ids: set[str] = set()
        for position, event in enumerate(events):
            reason = event.invalid or invalid_reason(event.fields, now)
            if reason:
                self._drop(results[position], C.DROP_REASON_INVALID, reason)
            elif event.fields.event_id in seen_ids:
                self._drop(results[position], C.DROP_REASON_DUPLICATE, "repeated in this batch")
            elif event.identifiers and all(i.blocked for i in event.identifiers):
                self._drop(results[position], C.DROP_REASON_IDENTIFIER_BLOCKED)
            else:
                seen_ids.add(event.fields.event_id)
                live.append(position)
        self._resolve_persons(events, results, live, resolve)
        live = [p for p in live if not results[p].drop_reason]
        if not live:
            return results
        for attempt in range(2):
            try:
                self._store(events, results, live, now)
                break
            except IntegrityError:
                # Another batch stored one of these event ids first: look again, once.
                if attempt:
                    raise
        return results

    @staticmethod
    def _drop(result: CollectResult, reason: DropReason, detail: str = "") -> None:
        result.accepted, result.drop_reason, result.detail = False, reason, detail
        result.purposes = ()

    def _resolve_persons(
        self,
        events: Sequence[CollectInput],
        results: list[CollectResult],
        live: list[int],
        resolve: Resolver,
    ) -> None:
        by_identifiers = [p for p in live if not events[p].person_id]
        if by_identifiers:
            persons = resolve(
                [events[p].identifiers for p in by_identifiers],
                [events[p].fields.channel or "unknown" for p in by_identifiers],
            )
            for position, person in zip(by_identifiers, persons, strict=True):
                if person:
                    results[position].person_id = person
                else:
                    self._drop(results[position], C.DROP_REASON_IDENTIFIER_BLOCKED)
        for position in live:
            if events[position].person_id:
                results[position].person_id = events[position].person_id

    def _store(
        self,
        events: Sequence[CollectInput],
        results: list[CollectResult],
        live: list[int],
        now: datetime,
    ) -> None:
        purposes = self.consent.purposes()
        current = tuple(purposes.values())
        in_order, generation = self._purposes
        if current != in_order:
            with self._purposes_lock:  # one generation, one set of purposes
                in_order, generation = self._purposes
                if current != in_order:
                    self._purposes = (current, generation + 1)
                in_order, generation = self._purposes
        candidates = [p for p in live if not results[p].drop_reason]
        persons = sorted({results[p].person_id for p in candidates})
        store = self.store
        with self._writing() as connection:
            erased_persons = self._erased.among(connection, persons)
            timelines = self._timelines(connection, persons)
            existing = store.existing_event_ids(
                connection, [events[p].fields.event_id for p in candidates]
            )
            accepted: list[int] = []
            for position in candidates:
                result = results[position]
                fields = events[position].fields
                if result.person_id in erased_persons:
                    self._drop(result, C.DROP_REASON_ERASED)
                elif fields.event_id in existing:
                    self._drop(result, C.DROP_REASON_DUPLICATE, "already collected")
                else:
                    occurred_at = fields.occurred_at
                    assert occurred_at is not None
                    admission = timelines[result.person_id].admit(
                        in_order, occurred_at, now, generation=generation
                    )
                    if admission.purposes:
                        result.accepted, result.purposes = True, admission.purposes
                        accepted.append(position)
                    else:
                        self._drop(result, admission.drop_reason)
            rows, bodies = self._rows(events, results, accepted, purposes, now)
            store.insert_events(connection, rows)
            self.consent.store.outbox.append(connection, bodies, occurred_at=now)

    def _timelines(
        self, connection: Connection, persons: Sequence[str]
    ) -> dict[str, ConsentTimeline]:
        """Each person's consent timeline, from its own decisions and, for a person identity
        merged with others, theirs too (``person_groups``): the newest decision decides."""
        groups = person_groups(connection, persons)
        members = {member for group in groups.values() for member in group}
        timelines = self.timelines.of(connection, [*persons, *sorted(members)])
        for person, group in groups.items():
            decisions = sorted(
                (d for member in group for d in timelines[member].decisions),
                key=lambda d: d.seq,
            )
            timelines[person] = ConsentTimeline(decisions)
        return timelines

    def _rows(
        self,
        events: Sequence[CollectInput],
        results: list[CollectResult],
        accepted: list[int],
        purposes: dict[str, PurposeDefinition],
        now: datetime,
    ) -> tuple[list[tuple[Any, ...]], list[events_pb2.BehaviourRecorded]]:
        # A batch has a handful of distinct purpose sets: what each keeps, and for how long, is
        # worked out once.
        serving_of: dict[tuple[str, ...], tuple[frozenset[str], timedelta]] = {}
        for position in accepted:
            names = results[position].purposes
            if names not in serving_of:
                serving = [purposes[name] for name in names]
                kept_for = retain_until(_EPOCH, serving) - _EPOCH
                serving_of[names] = (kept_fields(serving), kept_for)
        with_query = [
            results[p].person_id
            for p in accepted
            if events[p].fields.query and "query" in serving_of[results[p].purposes][0]
        ]
        keys = self.consent.keystore.data_keys(with_query) if with_query else {}
        rows: list[tuple[Any, ...]] = []  # in EVENT_COLUMNS order
        bodies: list[events_pb2.BehaviourRecorded] = []
        for position in accepted:
            result = results[position]
            person, names = result.person_id, result.purposes
            keep, kept_for = serving_of[names]
            kept = minimise(events[position].fields, keep)
            occurred_at = kept.occurred_at
            assert occurred_at is not None
            ciphertext = None
            if kept.query:
                ciphertext = encrypt_field(
                    keys[person], kept.query.encode(), kept.event_id.encode()
                )
            attributes = dict(kept.attributes) if kept.attributes else _NO_ATTRIBUTES
            rows.append(
                (
                    kept.event_id,
                    person,
                    int(kept.type),
                    kept.item_id,
                    kept.category,
                    kept.value,
                    kept.dwell_ms,
                    kept.quantity,
                    kept.currency,
                    kept.channel,
                    occurred_at,
                    now,
                    occurred_at + kept_for,
                    names,
                    attributes,
                    ciphertext,
                )
            )
            body = events_pb2.BehaviourRecorded(
                person_id=person,
                event_id=kept.event_id,
                type=kept.type,
                item_id=kept.item_id,
                category=kept.category,
                value=kept.value,
                dwell_ms=kept.dwell_ms,
                quantity=kept.quantity,
                channel=kept.channel,
                occurred_at=_event_stamp(occurred_at),
                purposes=names,
                has_query=bool(kept.query),
            )
            if attributes:  # a map argument takes the slow path even when empty
                body.attributes.update(attributes)
            bodies.append(body)
        return rows, bodies

    # Erasure -------------------------------------------------------------------------------------

    def begin_erasure(
        self, person_id: str, aliases: Sequence[str], reason: str, actor: str
    ) -> ErasureView:
        """Consent's part: delete events and decisions, tombstone, SubjectErased, shred keys."""
        now = self.consent.clock()
        everyone = [person_id, *[a for a in aliases if a != person_id]]
        erasure_id = f"e_{secrets.token_hex(12)}"
        subject = self.consent.keystore.subject(person_id)
        with self.consent.store.writing() as connection:
            open_erasure = self.store.open_erasure_of(connection, person_id)
            if open_erasure is not None:
                return _erasure_view(open_erasure)
            deleted_events, deleted_decisions = self.store.delete_person_data(connection, everyone)
            self.store.mark_erased(
                connection, [d for p in everyone for d in self.erased_digests(p)], now
            )
            [tombstone] = self.consent.store.append_ledger(
                connection,
                [
                    ledger.LedgerRecord(
                        seq=0,
                        recorded_at=now,
                        kind=A.ENTRY_KIND_ERASURE_TOMBSTONE,
                        subject=subject,
                        actor=actor,
                        occurred_at=now,
                        details={"erasure_id": erasure_id},
                    )
                ],
            )
            [erased] = self.consent.store.outbox.append(
                connection,
                [
                    events_pb2.SubjectErased(
                        person_id=person_id,
                        erasure_id=erasure_id,
                        alias_person_ids=everyone[1:],
                    )
                ],
                occurred_at=now,
            )
            # Without consumers to wait for, what named the person leaves the log at once.
            self.consent.store.outbox.redact_settled(connection, self.consent.consumers)
            # Each consumer's part is done once it acknowledges the SubjectErased envelope.
            services: dict[str, dict[str, Any]] = {
                consumer: {
                    "state": C.ERASURE_STATE_PENDING,
                    "completed_at": None,
                    "detail": "",
                    "awaits_seq": erased.seq,
                }
                for consumer in self.consent.consumers
            }
            services |= {
                "consent": {
                    "state": C.ERASURE_STATE_DONE,
                    "completed_at": now.isoformat(),
                    "detail": f"{deleted_events} events, {deleted_decisions} decisions deleted",
                },
                "identity": {"state": C.ERASURE_STATE_PENDING, "completed_at": None, "detail": ""},
            }
            self.store.save_erasure(
                connection,
                {
                    "erasure_id": erasure_id,
                    "person_id": person_id,
                    "reason": reason,
                    "state": C.ERASURE_STATE_IN_PROGRESS,
                    "requested_at": now,
                    "completed_at": None,
                    "services": services,
                    "tombstone_seq": tombstone.record.seq,
                },
            )
        # The data keys live in their own database: destroyed once the tombstone is committed.
        self.consent.keystore.destroy(everyone)
        self.timelines.forget(everyone)
        return self.erasure(erasure_id)

    def finish_part(
        self, erasure_id: str, service: str, *, ok: bool, detail: str = ""
    ) -> ErasureView:
        """Record a service's part; when every part is done, complete the erasure on the ledger."""
        now = self.consent.clock()
        with self.consent.store.writing() as connection:
            row = self.store.erasure(connection, erasure_id)
            if row is None:
                raise NotFound("erasure", erasure_id)
            self.finish_parts(connection, row, {service: (ok, detail)}, now)
        return self.erasure(erasure_id)

    def finish_parts(
        self,
        connection: Connection,
        row: Any,
        parts: dict[str, tuple[bool, str]],
        now: datetime,
    ) -> None:
        """Record services' parts (service to (ok, detail)) of the erasure ``row`` in the
        caller's transaction; the last part done appends the completion entry to the ledger."""
        services = dict(row.services)
        for service, (ok, detail) in parts.items():
            services[service] = {
                "state": C.ERASURE_STATE_DONE if ok else C.ERASURE_STATE_FAILED,
                "completed_at": now.isoformat() if ok else None,
                "detail": detail,
            }
        values: dict[str, Any] = {"services": services}
        if all(part["state"] == C.ERASURE_STATE_DONE for part in services.values()):
            self.consent.store.append_ledger(
                connection,
                [
                    ledger.LedgerRecord(
                        seq=0,
                        recorded_at=now,
                        kind=A.ENTRY_KIND_ERASURE_COMPLETED,
                        actor="system",
                        occurred_at=now,
                        details={"erasure_id": row.erasure_id},
                    )
                ],
            )
            values.update(state=C.ERASURE_STATE_DONE, completed_at=now, person_id=None)
        elif any(part["state"] == C.ERASURE_STATE_FAILED for part in services.values()):
            values.update(state=C.ERASURE_STATE_FAILED)
        else:
            values.update(state=C.ERASURE_STATE_IN_PROGRESS)
        self.store.update_erasure(connection, row.erasure_id, values)

    def erasure(self, erasure_id: str) -> ErasureView:
        with self.consent.store.reading() as connection:
            row = self.store.erasure(connection, erasure_id)
        if row is None:
            raise NotFound("erasure", erasure_id)
        return _erasure_view(row)

    # Access --------------------------------------------------------------------------------------

    def subject_data(self, person_id: str, aliases: Sequence[str]) -> SubjectData:
        """Consent history and collected events (search text decrypted) of a person."""
        everyone = [person_id, *[a for a in aliases if a != person_id]]
        with self.consent.store.reading() as connection:
            decisions = self.store.decisions_of_many(connection, everyone)
            rows = self.store.events_of(connection, everyone)
        keys = self.consent.keystore.data_keys(
            {row.person_id for row in rows if row.query_ciphertext}, create=False
        )
        events = []
        for row in rows:
            query = ""
            if row.query_ciphertext and row.person_id in keys:
                query = decrypt_field(
                    keys[row.person_id], bytes(row.query_ciphertext), row.event_id.encode()
                ).decode()
            events.append(
                {
                    "event_id": row.event_id,
                    "type": row.type,
                    "item_id": row.item_id,
                    "category": row.category,
                    "value": row.value,
                    "dwell_ms": row.dwell_ms,
                    "query": query,
                    "channel": row.channel,
                    "occurred_at": utc(row.occurred_at),
                    "purposes": list(row.purposes),
                    "attributes": dict(row.attributes),
                    "quantity": row.quantity,
                }
            )
        history = sorted((d for ds in decisions.values() for d in ds), key=lambda d: d.seq)
        return SubjectData(person_id, history, events)

    def sweep(self) -> dict[str, int]:
        """Delete events past their purposes' retention; returns counts by event type name."""
        now = datetime.now(UTC)
        with self.consent.store.writing() as connection:
            self.consent.store.changes_checks_of(connection, ())  # events only
            removed = self.store.sweep(connection, now)
        return {
            common_pb2.EventType.Name(common_pb2.EventType.ValueType(int(k)))
            .removeprefix("EVENT_TYPE_")
            .lower(): v
            for k, v in removed.items()
        }


def _erasure_view(row: Any) -> ErasureView:
    return ErasureView(
        erasure_id=row.erasure_id,
        person_id=row.person_id or "",
        state=row.state,
        requested_at=utc(row.requested_at),
        completed_at=None if row.completed_at is None else utc(row.completed_at),
        services=dict(row.services),
        tombstone_seq=row.tombstone_seq,
    )
