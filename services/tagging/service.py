"""The tagging service's use cases: profiles and tags kept up to date from the event logs,
rule sets, explanations, objections and audiences.

Real time: every envelope that touches a person recomputes that person's profile and tags in the
consumer's transaction. Batch: a new rule set, or the daily roll, re-evaluates everyone.
Evidence for ``min_evidence`` is the person's events in the last 90 days.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.engine import Connection, Engine
from steward.events.v1 import events_pb2

from services.common.db import is_postgres
from services.common.errors import FailedPrecondition, NotFound
from services.common.outbox import Outbox
from services.tagging import ingest
from services.tagging.aggregates import (
    Event,
    RfmThresholds,
    compute_profile,
    purchases_of,
    rfm_thresholds,
)
from services.tagging.guardrails import (
    PROFILING_PURPOSE,
    AssignedTag,
    ChangeKind,
    Objections,
    SuppressedTag,
    TagChange,
    assign_tags,
    audience_size_report,
    withdrawal_reason,
)
from services.tagging.profile import ProfileDict
from services.tagging.rules import ParsedRuleSet, parse_rule_set
from services.tagging.store import (
    PRODUCER,
    events_table,
    objections_table,
    population_table,
    profiles_table,
    rule_sets_table,
    suppressed_table,
    tags_table,
    utc,
)

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime]
REASON_UNMERGED: Final = "unmerged"
_WRITE_LOCK: Final = zlib.crc32(b"steward.tagging.persons")

_CHANGE_KINDS = {
    ChangeKind.ASSIGNED: events_pb2.TAG_CHANGE_ASSIGNED,
    ChangeKind.RENEWED: events_pb2.TAG_CHANGE_RENEWED,
    ChangeKind.EXPIRED: events_pb2.TAG_CHANGE_EXPIRED,
    ChangeKind.SUPPRESSED: events_pb2.TAG_CHANGE_SUPPRESSED,
    ChangeKind.REMOVED: events_pb2.TAG_CHANGE_REMOVED,
}


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PersonTags:
    person_id: str
    tags: list[AssignedTag]
    suppressed: list[SuppressedTag]
    objections: list[tuple[str, str, datetime]]
    """(tag id or ``*`` for all profiling, reason, recorded at)."""


class TaggingService:
    """Profiles, tags and rule sets over the tagging database."""

    def __init__(self, engine: Engine, outbox: Outbox, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.outbox = outbox
        self.clock = clock
        self._lock = threading.Lock()
        self._rule_set: ParsedRuleSet | None = None
        self._loaded = False

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self.outbox.begin(self.engine) as connection:
            lock_persons(connection)
            yield connection

    # Rule sets -----------------------------------------------------------------------------------

    def rule_set(self) -> ParsedRuleSet | None:
        """The current rule set (None until the first PutRuleSet)."""
        with self._lock:
            if not self._loaded:
                with self.engine.connect() as connection:
                    row = connection.execute(
                        select(rule_sets_table).order_by(rule_sets_table.c.version.desc()).limit(1)
                    ).first()
                self._rule_set = (
                    None if row is None else parse_rule_set(row.yaml).with_version(row.version)
                )
                self._loaded = True
            return self._rule_set

    def stored_rule_set(self, version: int) -> tuple[ParsedRuleSet, Any]:
        with self.engine.connect() as connection:
            query = select(rule_sets_table)
            query = (
                query.where(rule_sets_table.c.version == version)
                if version
                else query.order_by(rule_sets_table.c.version.desc()).limit(1)
            )
            row = connection.execute(query).first()
        if row is None:
            raise NotFound("rule set", str(version or "current"))
        return parse_rule_set(row.yaml).with_version(row.version), row

    def put_rule_set(self, yaml_text: str, actor: str) -> tuple[ParsedRuleSet, Any]:
        parsed = parse_rule_set(yaml_text)
        now = self.clock()
        with self._writing() as connection:
            latest = connection.execute(select(func.max(rule_sets_table.c.version))).scalar()
            version = int(latest or 0) + 1
            connection.execute(
                insert(rule_sets_table).values(
                    version=version, yaml=yaml_text, actor=actor, created_at=now
                )
            )
            with self._lock:
                self._rule_set = parsed.with_version(version)
                self._loaded = True
            persons = list(connection.execute(select(profiles_table.c.person_id)).scalars())
            self.reevaluate(connection, persons)
        return self.stored_rule_set(version)

    # Consumers -----------------------------------------------------------------------------------

    def apply_consent_envelope(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        lock_persons(connection)
        self.reevaluate(connection, ingest.apply_consent_log(connection, envelope))

    def apply_identity_envelope(
        self, connection: Connection, envelope: events_pb2.Envelope
    ) -> None:
        lock_persons(connection)
        persons = ingest.apply_identity_log(connection, envelope)
        # After an unmerge no tag may rest on the other person's events: both are decided afresh.
        afresh = persons if envelope.WhichOneof("body") == "person_unmerged" else set()
        self.reevaluate(connection, persons, afresh=afresh)

    # Evaluation ----------------------------------------------------------------------------------

    def thresholds(self, connection: Connection) -> RfmThresholds:
        row = connection.execute(
            select(population_table.c.value).where(population_table.c.name == "rfm")
        ).first()
        if row is None:
            return RfmThresholds()
        value = row[0]
        return RfmThresholds(
            tuple(value["recency_days"]), tuple(value["frequency"]), tuple(value["monetary"])
        )

    def refresh_rfm(self) -> RfmThresholds:
        """Recompute the population's RFM quintiles (periodically) and re-evaluate everyone."""
        now = self.clock()
        with self._writing() as connection:
            persons = list(connection.execute(select(profiles_table.c.person_id)).scalars())
            histories = [purchases_of(self._events(connection, p)) for p in persons]
            thresholds = rfm_thresholds(histories, now)
            connection.execute(delete(population_table).where(population_table.c.name == "rfm"))
            connection.execute(
                insert(population_table).values(
                    name="rfm",
                    value={
                        "recency_days": list(thresholds.recency_days),
                        "frequency": list(thresholds.frequency),
                        "monetary": list(thresholds.monetary),
                    },
                    computed_at=now,
                )
            )
            self.reevaluate(connection, persons)
        return thresholds

    def _events(self, connection: Connection, person_id: str) -> list[Event]:
        return self._events_and_origins(connection, person_id)[0]

    def _events_and_origins(
        self, connection: Connection, person_id: str
    ) -> tuple[list[Event], set[str]]:
        """The person's events, and the persons they were collected for (more than the person
        itself after a merge)."""
        rows = connection.execute(
            select(events_table).where(events_table.c.person_id == person_id)
        ).all()
        return [
            Event(
                row.event_id,
                row.type,
                utc(row.occurred_at),
                row.item_id,
                row.category,
                row.value,
                row.dwell_ms,
                row.quantity,
                row.channel,
            )
            for row in rows
        ], {row.origin_person_id for row in rows}

    def _current(self, connection: Connection, person_id: str) -> dict[str, AssignedTag]:
        rows = connection.execute(select(tags_table).where(tags_table.c.person_id == person_id))
        return {row.tag_id: _assigned(row) for row in rows}

    def _objections(self, connection: Connection, person_ids: Collection[str]) -> Objections:
        """The objections of ``person_ids``: a person and every person whose events were merged
        into it (an unmerge takes them away again with the events)."""
        tags = set(
            connection.execute(
                select(objections_table.c.tag_id).where(
                    objections_table.c.person_id.in_(sorted(person_ids))
                )
            ).scalars()
        )
        return Objections(all_profiling="*" in tags, tag_ids=frozenset(tags - {"*"}))

    def reevaluate(
        self, connection: Connection, persons: Iterable[str], *, afresh: Collection[str] = ()
    ) -> None:
        """Recompute profiles and tags of ``persons`` in the caller's transaction.

        Persons in ``afresh`` get their tags decided as if they carried none (tags kept only
        because they have not expired yet are removed, reason ``unmerged``)."""
        people = sorted(set(persons))
        if not people:
            return
        now = self.clock()
        rules = self.rule_set()
        thresholds = self.thresholds(connection)
        bodies: list[events_pb2.TagChanged] = []
        for person in people:
            events, origins = self._events_and_origins(connection, person)
            consented = ingest.consented_purposes(connection, person, now)
            connection.execute(delete(profiles_table).where(profiles_table.c.person_id == person))
            profile: ProfileDict | None = None
            if events:
                profile = compute_profile(person, events, now, thresholds)
                connection.execute(
                    insert(profiles_table).values(
                        person_id=person, profile=profile, computed_at=now
                    )
                )
            carried = self._current(connection, person)
            current = {} if person in afresh else carried
            if rules is None or profile is None:
                decision_tags: list[AssignedTag] = []
                suppressed: list[SuppressedTag] = []
                gone = (
                    "no profile"
                    if PROFILING_PURPOSE in consented
                    else withdrawal_reason(PROFILING_PURPOSE)
                )
                changes = [TagChange(tag_id, ChangeKind.REMOVED, gone) for tag_id in carried]
            else:
                latest = max(e.occurred_at for e in events)
                decision = assign_tags(
                    rules,
                    profile,
                    evidence_counts={r.id: _evidence(profile) for r in rules.rules},
                    consented_purposes=consented,
                    objections=self._objections(connection, {person, *origins}),
                    current=current,
                    now=now,
                    latest_evidence_at=latest,
                )
                decision_tags = list(decision.tags)
                suppressed = list(decision.suppressed)
                changes = list(decision.changes)
                if person in afresh:
                    kept = {tag.tag_id for tag in decision_tags}
                    changes.extend(
                        TagChange(tag_id, ChangeKind.REMOVED, REASON_UNMERGED)
                        for tag_id in sorted(carried)
                        if tag_id not in kept
                    )
            self._save(connection, person, decision_tags, suppressed)
            version = rules.version if rules is not None else 0
            expiries = {t.tag_id: t.expires_at for t in decision_tags}
            bodies.extend(
                events_pb2.TagChanged(
                    person_id=person,
                    tag_id=change.tag_id,
                    change=_CHANGE_KINDS[change.kind],
                    reason=change.reason,
                    rule_set_version=version,
                    expires_at=_stamp(expiries.get(change.tag_id)),
                )
                for change in changes
            )
        self.outbox.append(connection, bodies, occurred_at=now)

    def _save(
        self,
        connection: Connection,
        person: str,
        tags: Sequence[AssignedTag],
        suppressed: Sequence[SuppressedTag],
    ) -> None:
        connection.execute(delete(tags_table).where(tags_table.c.person_id == person))
        connection.execute(delete(suppressed_table).where(suppressed_table.c.person_id == person))
        if tags:
            connection.execute(
                insert(tags_table),
                [
                    {
                        "person_id": person,
                        "tag_id": t.tag_id,
                        "rule_set_version": t.rule_set_version,
                        "purpose": t.purpose,
                        "category": t.category,
                        "description": t.description,
                        "condition": t.condition,
                        "field_values": {
                            "values": dict(t.field_values),
                            "rule_id": t.rule_id,
                            "confirmed_at": t.confirmed_at.isoformat(),
                        },
                        "evidence_count": t.evidence_count,
                        "priority": t.priority,
                        "assigned_at": t.assigned_at,
                        "expires_at": t.expires_at,
                    }
                    for t in tags
                ],
            )
        if suppressed:
            connection.execute(
                insert(suppressed_table),
                [
                    {
                        "person_id": person,
                        "tag_id": s.tag_id,
                        "priority": s.priority,
                        "evidence_count": s.evidence_count,
                        "reason": s.reason,
                    }
                    for s in suppressed
                ],
            )

    def expire(self) -> int:
        """Re-evaluate persons with a tag past its expiry (the periodic roll)."""
        now = self.clock()
        with self._writing() as connection:
            persons = list(
                connection.execute(
                    select(tags_table.c.person_id).where(tags_table.c.expires_at <= now).distinct()
                ).scalars()
            )
            self.reevaluate(connection, persons)
        return len(persons)

    # Queries -------------------------------------------------------------------------------------

    def tags_of(self, person_id: str) -> PersonTags:
        now = self.clock()
        with self.engine.connect() as connection:
            tags = [
                _assigned(row)
                for row in connection.execute(
                    select(tags_table)
                    .where(tags_table.c.person_id == person_id, tags_table.c.expires_at > now)
                    .order_by(tags_table.c.priority.desc(), tags_table.c.tag_id)
                )
            ]
            suppressed = [
                SuppressedTag(row.tag_id, row.priority, row.evidence_count, row.reason)
                for row in connection.execute(
                    select(suppressed_table).where(suppressed_table.c.person_id == person_id)
                )
            ]
            objections = [
                (row.tag_id, row.reason, utc(row.recorded_at))
                for row in connection.execute(
                    select(objections_table).where(objections_table.c.person_id == person_id)
                )
            ]
        return PersonTags(person_id, tags, suppressed, objections)

    def profile_of(self, person_id: str) -> ProfileDict:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(profiles_table.c.profile).where(profiles_table.c.person_id == person_id)
            ).first()
        if row is None:
            raise NotFound("profile", person_id)
        return dict(row[0])

    def object_to(self, person_id: str, tag_id: str, reason: str) -> tuple[datetime, list[str]]:
        """Record an objection (``*`` = all profiling); returns when, and the tags removed."""
        now = self.clock()
        with self._writing() as connection:
            before = set(self._current(connection, person_id))
            connection.execute(
                delete(objections_table).where(
                    objections_table.c.person_id == person_id, objections_table.c.tag_id == tag_id
                )
            )
            connection.execute(
                insert(objections_table).values(
                    person_id=person_id, tag_id=tag_id, reason=reason, recorded_at=now
                )
            )
            self.reevaluate(connection, [person_id])
            after = set(self._current(connection, person_id))
        return now, sorted(before - after)

    def audience(self, tag_id: str, page_size: int, after: str) -> tuple[list[str], int]:
        """A page of the persons carrying ``tag_id`` (refused below the k floor) and the size."""
        rules = self.rule_set()
        if rules is None or rules.rule(tag_id) is None:
            raise NotFound("tag", tag_id)
        now = self.clock()
        with self.engine.connect() as connection:
            live = (tags_table.c.tag_id == tag_id) & (tags_table.c.expires_at > now)
            size = int(connection.execute(select(func.count()).where(live)).scalar_one())
            reported, fewer = audience_size_report(size, rules.k_floor)
            if fewer:
                raise FailedPrecondition(
                    [
                        (
                            "K_ANONYMITY",
                            f"tags/{tag_id}",
                            f"the audience has fewer than {rules.k_floor} persons",
                        )
                    ],
                    f"audience of fewer than {rules.k_floor} persons (the k floor)",
                )
            persons = list(
                connection.execute(
                    select(tags_table.c.person_id)
                    .where(live, tags_table.c.person_id > after)
                    .order_by(tags_table.c.person_id)
                    .limit(page_size)
                ).scalars()
            )
        return persons, reported

    def population_columns(self) -> list[ProfileDict]:
        with self.engine.connect() as connection:
            return [dict(row[0]) for row in connection.execute(select(profiles_table.c.profile))]


def lock_persons(connection: Connection) -> None:
    """Takes tagging's write lock for the rest of the transaction, before any person's rows.

    A re-evaluation deletes and re-inserts a person's rows; two at once (a consumer and
    PutRuleSet, say) would collide on PostgreSQL. SQLite's write transactions are exclusive.
    """
    if is_postgres(connection):
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _WRITE_LOCK})


def _assigned(row: Any) -> AssignedTag:
    stored = dict(row.field_values)
    return AssignedTag(
        tag_id=row.tag_id,
        category=row.category,
        description=row.description,
        purpose=row.purpose,
        rule_id=stored.get("rule_id", row.tag_id),
        rule_set_version=row.rule_set_version,
        condition=row.condition,
        field_values=dict(stored.get("values", {})),
        evidence_count=row.evidence_count,
        assigned_at=utc(row.assigned_at),
        confirmed_at=(
            datetime.fromisoformat(stored["confirmed_at"])
            if "confirmed_at" in stored
            else utc(row.assigned_at)
        ),
        expires_at=utc(row.expires_at),
        priority=row.priority,
    )


def _evidence(profile: ProfileDict) -> int:
    """Evidence for ``min_evidence``: the person's events in the last 90 days."""
    value = profile.get("events_90d", 0)
    return value if isinstance(value, int) else 0


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    value = Timestamp()
    value.FromDatetime(moment)
    return value


__all__ = ["PRODUCER", "PersonTags", "TaggingService"]
