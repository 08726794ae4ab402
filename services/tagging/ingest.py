"""What tagging does with each envelope of consent's and identity's logs.

Each function runs inside the consumer's transaction (the cursor advances in the same commit),
so an envelope is applied exactly once. They return the persons whose profile and tags must be
recomputed (:func:`touched` says the same from the envelope alone); the caller does that in the
same transaction, once per person for a whole batch of envelopes.

- BehaviourRecorded for ``profiling``: the minimised event is kept (other events are ignored).
- ConsentChanged: the consent state is remembered; a withdrawal of ``profiling`` deletes the
  person's events and profile at once (tags gated on any withdrawn purpose go on re-evaluation).
- PersonsMerged folds the absorbed persons' events into the survivor (whose own consent decides);
  PersonUnmerged hands back the events collected for the restored person, whose consent is as
  last heard before the merge; PersonForgotten and SubjectErased delete everything about the
  persons.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from steward.events.v1 import events_pb2

from services.common.outbox import ERASING_BODIES
from services.common.person_links import handed_back
from services.tagging.store import (
    PERSON_LINKS,
    consents_table,
    events_table,
    objections_table,
    profiles_table,
    suppressed_table,
    tags_table,
)

PROFILING: Final = "profiling"
PERSON_TABLES: Final = (
    events_table,
    consents_table,
    profiles_table,
    tags_table,
    suppressed_table,
    objections_table,
)


def _upsert(connection: Connection) -> object:
    return postgresql if connection.dialect.name == "postgresql" else sqlite


def touched(envelope: events_pb2.Envelope) -> tuple[set[str], set[str]]:
    """The persons whose profile and tags an envelope changes, and those of them whose tags must
    be decided afresh (both persons of an unmerge). Erased and forgotten persons have nothing left
    to re-evaluate."""
    body = envelope.WhichOneof("body")
    if body == "behaviour_recorded":
        event = envelope.behaviour_recorded
        return ({event.person_id} if PROFILING in event.purposes else set()), set()
    if body == "consent_changed":
        return {envelope.consent_changed.person_id}, set()
    if body == "persons_merged":
        return {envelope.persons_merged.surviving_person_id}, set()
    if body == "person_unmerged":
        split = envelope.person_unmerged
        both = {split.surviving_person_id, split.restored_person_id}
        return both, set(both)
    return set(), set()


def erased(envelopes: Sequence[events_pb2.Envelope]) -> list[str]:
    """The persons these envelopes erase or forget (aliases included)."""
    persons: list[str] = []
    for envelope in envelopes:
        body = envelope.WhichOneof("body")
        if body in ERASING_BODIES:
            gone = getattr(envelope, body)
            persons.extend([gone.person_id, *gone.alias_person_ids])
    return persons


def apply_consent_log(connection: Connection, envelope: events_pb2.Envelope) -> set[str]:
    body = envelope.WhichOneof("body")
    if body == "behaviour_recorded":
        return _behaviour(connection, envelope.behaviour_recorded)
    if body == "consent_changed":
        return _consent(connection, envelope.consent_changed)
    if body == "subject_erased":
        erased = envelope.subject_erased
        persons = [erased.person_id, *erased.alias_person_ids]
        forget(connection, persons)
        PERSON_LINKS.forget(connection, persons)
    return set()


def apply_identity_log(connection: Connection, envelope: events_pb2.Envelope) -> set[str]:
    body = envelope.WhichOneof("body")
    change = PERSON_LINKS.apply(connection, envelope)
    if body == "persons_merged":
        merged = envelope.persons_merged
        absorbed = list(merged.absorbed_person_ids)
        connection.execute(
            update(events_table)
            .where(events_table.c.person_id.in_(absorbed))
            .values(person_id=merged.surviving_person_id)
        )
        # The survivor decides with its own consent; the absorbed persons' consent rows stay,
        # unused, so that an unmerge gives them back their own.
        for table in (profiles_table, tags_table, suppressed_table):
            connection.execute(delete(table).where(table.c.person_id.in_(absorbed)))
        return {merged.surviving_person_id}
    if body == "person_unmerged":
        split = envelope.person_unmerged
        holder = PERSON_LINKS.root_of(connection, split.surviving_person_id)
        back = handed_back(change, split, events_table.c.origin_person_id, events_table.c.person_id)
        connection.execute(
            update(events_table).where(back).values(person_id=split.restored_person_id)
        )
        return {holder, split.restored_person_id}
    if body == "person_forgotten":
        forgotten = envelope.person_forgotten
        forget(connection, [forgotten.person_id, *forgotten.alias_person_ids])
    return set()


def _behaviour(connection: Connection, event: events_pb2.BehaviourRecorded) -> set[str]:
    if PROFILING not in event.purposes:
        return set()
    dialect = _upsert(connection)
    statement = dialect.insert(events_table).on_conflict_do_nothing(  # type: ignore[attr-defined]
        index_elements=[events_table.c.event_id]
    )
    connection.execute(
        statement,
        {
            "event_id": event.event_id,
            "person_id": event.person_id,
            "origin_person_id": event.person_id,
            "type": int(event.type),
            "item_id": event.item_id,
            "category": event.category,
            "value": event.value,
            "dwell_ms": event.dwell_ms,
            "quantity": event.quantity,
            "channel": event.channel,
            "occurred_at": event.occurred_at.ToDatetime(tzinfo=UTC),
        },
    )
    return {event.person_id}


def _consent(connection: Connection, change: events_pb2.ConsentChanged) -> set[str]:
    expires_at = change.expires_at.ToDatetime(tzinfo=UTC) if change.HasField("expires_at") else None
    dialect = _upsert(connection)
    values = {
        "person_id": change.person_id,
        "purpose": change.purpose,
        "allowed": change.allowed,
        "expires_at": expires_at,
        "ledger_seq": change.ledger_seq,
    }
    statement = dialect.insert(consents_table).values(**values)  # type: ignore[attr-defined]
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[consents_table.c.person_id, consents_table.c.purpose],
            set_={k: v for k, v in values.items() if k not in ("person_id", "purpose")},
        )
    )
    if change.purpose == PROFILING and not change.allowed:
        # The aggregates go at once; tags gated on the purpose go on re-evaluation.
        for table in (events_table, profiles_table):
            connection.execute(delete(table).where(table.c.person_id == change.person_id))
    return {change.person_id}


def forget(connection: Connection, person_ids: list[str]) -> None:
    """Delete every row about the persons."""
    for table in PERSON_TABLES:
        connection.execute(delete(table).where(table.c.person_id.in_(person_ids)))


def consented_purposes(connection: Connection, person_id: str, now: datetime) -> set[str]:
    rows = connection.execute(
        select(
            consents_table.c.purpose, consents_table.c.allowed, consents_table.c.expires_at
        ).where(consents_table.c.person_id == person_id)
    )
    allowed = set()
    for purpose, is_allowed, expires_at in rows:
        if not is_allowed:
            continue
        if expires_at is not None:
            moment = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)
            if moment <= now:
                continue
        allowed.add(purpose)
    return allowed
