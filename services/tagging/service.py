"""The tagging service's use cases: profiles and tags kept up to date from the event logs,
rule sets, explanations, objections and audiences.

Real time: the consumer applies a batch of envelopes, then recomputes the profile and tags of
every person the batch touched, once each, in the batch's transaction. Batch: a new rule set
re-evaluates everyone on their stored profiles; the daily roll recomputes every profile from the
events (windows move on, RFM quintiles are refreshed) and re-evaluates it.

Both go through one set-based path (:meth:`TaggingService.reevaluate`,
:meth:`TaggingService.reevaluate_stored`): rows are read and written with a few bulk statements
per chunk of persons, every condition is evaluated vectorised and the guardrails are applied to
arrays (:func:`guardrails.decide_population`). :meth:`TaggingService.reevaluate_each` is the
same one person at a time, kept as the reference the set-based path is tested against.
Evidence for ``min_evidence`` is the person's events in the rule's evidence window.
"""

from __future__ import annotations

import gc
import logging
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import metrics
from sqlalchemy import bindparam, delete, func, insert, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2

from services.common.db import is_postgres
from services.common.errors import FailedPrecondition, NotFound
from services.common.outbox import Outbox
from services.common.times import utc, utc_now
from services.tagging import ingest
from services.tagging.aggregates import (
    Event,
    RfmThresholds,
    compute_profile,
    rfm_thresholds,
)
from services.tagging.guardrails import (
    PROFILING_PURPOSE,
    AssignedTag,
    ChangeKind,
    Objections,
    PersonsState,
    SuppressedTag,
    TagChange,
    assign_tags,
    audience_size_report,
    decide_population,
    evidence_count,
    microseconds,
    withdrawal_reason,
)
from services.tagging.profile import ProfileColumns, ProfileDict
from services.tagging.rules import ParsedRuleSet, parse_rule_set
from services.tagging.store import (
    PERSON_LINKS,
    PRODUCER,
    consents_table,
    events_table,
    objections_table,
    population_table,
    profiles_table,
    rule_sets_table,
    suppressed_table,
    tags_table,
)

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime]
REASON_UNMERGED: Final = "unmerged"
_WRITE_LOCK: Final = zlib.crc32(b"steward.tagging.persons")
CHUNK: Final = 5_000
"""Persons per bulk statement (IN lists stay far below SQLite's and psycopg's parameter limits)."""
STORED_PAGE: Final = 20_000
"""Stored profiles re-evaluated at once by :meth:`TaggingService.reevaluate_stored`."""
ROLL_CHUNK: Final = 2_000
"""Persons per transaction of the daily roll, so the consumer is never held up for long."""
Selector = Callable[[Any], ColumnElement[bool]]
"""Picks a chunk's persons out of a table, given its ``person_id`` column."""

_CHANGE_KINDS = {
    ChangeKind.ASSIGNED: events_pb2.TAG_CHANGE_ASSIGNED,
    ChangeKind.RENEWED: events_pb2.TAG_CHANGE_RENEWED,
    ChangeKind.EXPIRED: events_pb2.TAG_CHANGE_EXPIRED,
    ChangeKind.SUPPRESSED: events_pb2.TAG_CHANGE_SUPPRESSED,
    ChangeKind.REMOVED: events_pb2.TAG_CHANGE_REMOVED,
}


@dataclass(frozen=True, slots=True)
class PersonTags:
    person_id: str
    tags: list[AssignedTag]
    suppressed: list[SuppressedTag]
    objections: list[tuple[str, str, datetime]]
    """(tag id or ``*`` for all profiling, reason, recorded at)."""


class TaggingService:
    """Profiles, tags and rule sets over the tagging database."""

    def __init__(
        self,
        engine: Engine,
        outbox: Outbox,
        clock: Clock = utc_now,
        *,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self._tag_changes = (
            None
            if meter is None
            else meter.create_counter(
                "steward.tagging.tag_changes",
                unit="{change}",
                description="Tags assigned, renewed, expired, removed and suppressed (by guardrail"
                " or reason)",
            )
        )
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
        """Store a new version and re-evaluate everyone with a profile in the same transaction
        (on their stored profiles)."""
        parsed = parse_rule_set(yaml_text)  # refused before the write lock is taken
        with self._writing() as connection:
            current = self.store_rule_set(connection, parsed, actor)
            self.reevaluate_stored(connection)
            row = connection.execute(
                select(rule_sets_table).where(rule_sets_table.c.version == current.version)
            ).one()
        return current, row

    def store_rule_set(
        self, connection: Connection, rule_set: ParsedRuleSet | str, actor: str
    ) -> ParsedRuleSet:
        """Store a rule set (parsed, or its YAML) as the next version and make it current,
        re-evaluating nobody."""
        parsed = parse_rule_set(rule_set) if isinstance(rule_set, str) else rule_set
        latest = connection.execute(select(func.max(rule_sets_table.c.version))).scalar()
        version = int(latest or 0) + 1
        connection.execute(
            insert(rule_sets_table).values(
                version=version, yaml=parsed.yaml, actor=actor, created_at=self.clock()
            )
        )
        current = parsed.with_version(version)
        with self._lock:
            self._rule_set = current
            self._loaded = True
        return current

    # Consumers -----------------------------------------------------------------------------------

    def ingest_consent_envelope(
        self, connection: Connection, envelope: events_pb2.Envelope
    ) -> None:
        """The consumer's ``apply`` for consent's log: record what the envelope says;
        :meth:`end_batch` re-evaluates the persons it touched."""
        lock_persons(connection)
        ingest.apply_consent_log(connection, envelope)

    def ingest_identity_envelope(
        self, connection: Connection, envelope: events_pb2.Envelope
    ) -> None:
        """The consumer's ``apply`` for identity's log (see :meth:`ingest_consent_envelope`)."""
        lock_persons(connection)
        ingest.apply_identity_log(connection, envelope)

    def end_batch(self, connection: Connection, envelopes: Sequence[events_pb2.Envelope]) -> None:
        """The consumer's ``end_batch``: re-evaluate each person the envelopes touched, once.

        After an unmerge no tag may rest on the other person's events: both are decided afresh.
        """
        persons: set[str] = set()
        afresh: set[str] = set()
        for envelope in envelopes:
            touched, decided_afresh = ingest.touched(envelope)
            persons |= touched
            afresh |= decided_afresh
        # An unmerge's survivor may have been merged into another person since: that one holds
        # the events handed back, and is decided afresh too.
        afresh |= {PERSON_LINKS.root_of(connection, person) for person in afresh}
        persons |= afresh
        lock_persons(connection)
        self.reevaluate(connection, persons, afresh=afresh)
        # Nobody in the suite reads tagging's log: what named an erased person goes at once.
        self.outbox.redact(connection, ingest.erased(envelopes))

    def apply_consent_envelope(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        """One envelope of consent's log, applied and its persons re-evaluated."""
        self.ingest_consent_envelope(connection, envelope)
        self.end_batch(connection, [envelope])

    def apply_identity_envelope(
        self, connection: Connection, envelope: events_pb2.Envelope
    ) -> None:
        """One envelope of identity's log, applied and its persons re-evaluated."""
        self.ingest_identity_envelope(connection, envelope)
        self.end_batch(connection, [envelope])

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
        """The daily roll: recompute the population's RFM quintiles, then every profile (its
        windows have moved on) and its tags, a chunk of persons per transaction."""
        now = self.clock()
        with self._writing() as connection:
            thresholds = self._rfm_thresholds(connection, now)
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
        with self.engine.connect() as connection:
            persons = list(
                connection.execute(
                    select(profiles_table.c.person_id).order_by(profiles_table.c.person_id)
                ).scalars()
            )
        for start in range(0, len(persons), ROLL_CHUNK):
            with self._writing() as connection:
                self.reevaluate(connection, persons[start : start + ROLL_CHUNK])
        return thresholds

    def _rfm_thresholds(self, connection: Connection, now: datetime) -> RfmThresholds:
        """Quintile cut points over the purchases of every person with a profile."""
        query = select(
            events_table.c.person_id,
            events_table.c.occurred_at,
            events_table.c.item_id,
            events_table.c.value,
        ).where(
            events_table.c.type == common_pb2.EVENT_TYPE_PURCHASE,
            events_table.c.person_id.in_(select(profiles_table.c.person_id)),
        )
        histories: defaultdict[str, list[tuple[datetime, str, float]]] = defaultdict(list)
        for person, occurred_at, item_id, value in connection.execute(query):
            histories[person].append((utc(occurred_at), item_id, value))
        return rfm_thresholds((sorted(history) for history in histories.values()), now)

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
        """Recompute the profiles and tags of ``persons`` from their events, in the caller's
        transaction, with bulk statements and vectorised guardrails.

        Persons in ``afresh`` get their tags decided as if they carried none (tags kept only
        because they have not expired yet are removed, reason ``unmerged``)."""
        people = sorted(set(persons))
        if not people:
            return
        with collector_paused():
            self._reevaluate(connection, people, afresh)

    def _reevaluate(
        self, connection: Connection, people: list[str], afresh: Collection[str]
    ) -> None:
        now = self.clock()
        rules = self.rule_set()
        thresholds = self.thresholds(connection)
        for start in range(0, len(people), CHUNK):
            chunk = people[start : start + CHUNK]
            profiles, latest, lifetime = self._recompute_profiles(
                connection, chunk, now, thresholds
            )
            self._decide(
                connection,
                chunk,
                _among(chunk),
                profiles,
                latest,
                lifetime,
                afresh=afresh,
                now=now,
                rules=rules,
            )

    def reevaluate_stored(self, connection: Connection) -> int:
        """Re-evaluate everyone with a profile on the profile as stored (a rule-set change: the
        behaviour is the same, the rules are not). Returns how many persons."""
        with collector_paused():
            return self._reevaluate_stored(connection)

    def _reevaluate_stored(self, connection: Connection) -> int:
        now = self.clock()
        rules = self.rule_set()
        after = ""
        total = 0
        while True:
            page = connection.execute(
                select(profiles_table.c.person_id, profiles_table.c.profile)
                .where(profiles_table.c.person_id > after)
                .order_by(profiles_table.c.person_id)
                .limit(STORED_PAGE)
            ).all()
            if not page:
                return total
            first, last = page[0][0], page[-1][0]

            def in_range(column: Any, first: str = first, last: str = last) -> Any:
                return column.between(first, last)

            profiles: dict[str, ProfileDict] = {person: profile for person, profile in page}
            latest: dict[str, datetime] = {}
            lifetime: dict[str, int] = {}
            seen = select(
                events_table.c.person_id,
                func.max(events_table.c.occurred_at),
                func.count(),
            ).where(in_range(events_table.c.person_id))
            for person, newest, count in connection.execute(
                seen.group_by(events_table.c.person_id)
            ):
                latest[person] = utc(newest)
                lifetime[person] = int(count)
            persons = list(profiles)
            # A profile outlives its events only inside a transaction that is deleting both.
            for person in persons:
                if person not in latest:
                    del profiles[person]
            self._decide(
                connection,
                persons,
                in_range,
                profiles,
                latest,
                lifetime,
                afresh=(),
                now=now,
                rules=rules,
            )
            total += len(persons)
            after = last

    def _recompute_profiles(
        self,
        connection: Connection,
        persons: list[str],
        now: datetime,
        thresholds: RfmThresholds,
    ) -> tuple[dict[str, ProfileDict], dict[str, datetime], dict[str, int]]:
        """Recompute and store the profiles of ``persons`` (none for a person without events);
        returns them with each person's newest event time and number of events."""
        events: defaultdict[str, list[Event]] = defaultdict(list)
        e = events_table.c
        query = select(
            e.person_id,
            e.event_id,
            e.type,
            e.occurred_at,
            e.item_id,
            e.category,
            e.value,
            e.dwell_ms,
            e.quantity,
            e.channel,
        ).where(e.person_id.in_(persons))
        for person, event_id, kind, occurred_at, *rest in connection.execute(query):
            events[person].append(Event(event_id, kind, utc(occurred_at), *rest))
        profiles = {
            person: compute_profile(person, events[person], now, thresholds)
            for person in persons
            if events.get(person)
        }
        connection.execute(delete(profiles_table).where(profiles_table.c.person_id.in_(persons)))
        if profiles:
            connection.execute(
                insert(profiles_table),
                [
                    {"person_id": person, "profile": profile, "computed_at": now}
                    for person, profile in profiles.items()
                ],
            )
        latest = {person: max(e.occurred_at for e in events[person]) for person in profiles}
        lifetime = {person: len(events[person]) for person in profiles}
        return profiles, latest, lifetime

    def _decide(
        self,
        connection: Connection,
        persons: list[str],
        selector: Selector,
        profiles: dict[str, ProfileDict],
        latest: dict[str, datetime],
        lifetime: dict[str, int],
        *,
        afresh: Collection[str],
        now: datetime,
        rules: ParsedRuleSet | None,
    ) -> None:
        """Decide and store the tags of ``persons`` (sorted; ``selector`` picks exactly their rows
        or a superset) given their profiles, and publish the changes."""
        wanted = set(persons)
        carried: dict[str, dict[str, AssignedTag]] = defaultdict(dict)
        for row in connection.execute(select(tags_table).where(selector(tags_table.c.person_id))):
            if row.person_id in wanted:
                carried[row.person_id][row.tag_id] = _assigned(row)
        had_suppressed: dict[str, set[tuple[str, int, int, str]]] = defaultdict(set)
        for row in connection.execute(
            select(suppressed_table).where(selector(suppressed_table.c.person_id))
        ):
            if row.person_id in wanted:
                had_suppressed[row.person_id].add(
                    (row.tag_id, row.priority, row.evidence_count, row.reason)
                )
        consented = self._consented(connection, selector, wanted, now)

        rated = [p for p in persons if p in profiles] if rules is not None else []
        changes: dict[str, list[tuple[TagChange, datetime | None]]] = defaultdict(list)
        written: list[tuple[str, AssignedTag]] = []
        deleted: list[tuple[str, str]] = []
        suppressed: dict[str, list[SuppressedTag]] = {}
        cleared: list[str] = []
        rated_set = set(rated)
        for person in persons:
            if person in rated_set:
                continue
            # No profile (or no rule set): every tag goes.
            gone = (
                "no profile"
                if PROFILING_PURPOSE in consented.get(person, ())
                else withdrawal_reason(PROFILING_PURPOSE)
            )
            held = carried.get(person, {})
            changes[person].extend(
                (TagChange(tag_id, ChangeKind.REMOVED, gone), None) for tag_id in sorted(held)
            )
            if held or had_suppressed.get(person):
                cleared.append(person)
        if rated:
            assert rules is not None
            objections = self._objections_of(connection, wanted)
            decision = decide_population(
                rules,
                self._state(
                    rules, rated, profiles, latest, lifetime, consented, objections, carried, afresh
                ),
                now=now,
                afresh_reason=REASON_UNMERGED,
            )
            written = [(rated[index], tag) for index, tag in decision.written]
            deleted = [(rated[index], tag_id) for index, tag_id in decision.deleted]
            for index, change, expiry in decision.changes:
                changes[rated[index]].append((change, expiry))
            for index, person in enumerate(rated):
                now_suppressed = decision.suppressed.get(index, [])
                if {
                    (s.tag_id, s.priority, s.evidence_count, s.reason) for s in now_suppressed
                } != had_suppressed.get(person, set()):
                    suppressed[person] = now_suppressed

        if cleared:
            for table in (tags_table, suppressed_table):
                connection.execute(delete(table).where(table.c.person_id.in_(cleared)))
        if deleted:
            connection.execute(
                delete(tags_table).where(
                    tags_table.c.person_id == bindparam("p"), tags_table.c.tag_id == bindparam("t")
                ),
                [{"p": person, "t": tag_id} for person, tag_id in deleted],
            )
        if written:
            connection.execute(
                insert(tags_table), [_tag_row(person, tag) for person, tag in written]
            )
        if suppressed:
            connection.execute(
                delete(suppressed_table).where(suppressed_table.c.person_id.in_(list(suppressed)))
            )
            rows = [
                _suppressed_row(person, entry)
                for person, entries in suppressed.items()
                for entry in entries
            ]
            if rows:
                connection.execute(insert(suppressed_table), rows)
        version = rules.version if rules is not None else 0
        bodies = [
            events_pb2.TagChanged(
                person_id=person,
                tag_id=change.tag_id,
                change=_CHANGE_KINDS[change.kind],
                reason=change.reason,
                rule_set_version=version,
                expires_at=_stamp(expiry),
            )
            for person in persons
            for change, expiry in changes.get(person, ())
        ]
        self._publish(connection, bodies, now)

    @staticmethod
    def _state(
        rules: ParsedRuleSet,
        rated: list[str],
        profiles: dict[str, ProfileDict],
        latest: dict[str, datetime],
        lifetime: dict[str, int],
        consented: dict[str, set[str]],
        objections: dict[str, set[str]],
        carried: dict[str, dict[str, AssignedTag]],
        afresh: Collection[str],
    ) -> PersonsState:
        rows = [profiles[person] for person in rated]
        purposes = {PROFILING_PURPOSE, *(rule.purpose for rule in rules.rules)}
        objected = {
            tag_id: np.array([tag_id in objections.get(p, ()) for p in rated], dtype=bool)
            for tag_id in {t for tags in objections.values() for t in tags} - {"*"}
        }
        return PersonsState(
            columns=ProfileColumns.from_profiles(rows),
            profiles=rows,
            lifetime_events=np.array([lifetime[p] for p in rated], dtype=np.int64),
            latest_evidence_at=[latest[p] for p in rated],
            consented={
                purpose: np.array([purpose in consented.get(p, ()) for p in rated], dtype=bool)
                for purpose in purposes
            },
            objected_to_all=np.array(["*" in objections.get(p, ()) for p in rated], dtype=bool),
            objected_to=objected,
            carried=[carried.get(p, {}) for p in rated],
            afresh=np.array([p in afresh for p in rated], dtype=bool),
        )

    def _consented(
        self, connection: Connection, selector: Selector, wanted: set[str], now: datetime
    ) -> dict[str, set[str]]:
        """The purposes each person has granted, as tagging last heard (expired grants lapse)."""
        granted: dict[str, set[str]] = defaultdict(set)
        query = select(consents_table.c.person_id, consents_table.c.purpose).where(
            selector(consents_table.c.person_id),
            consents_table.c.allowed,
            or_(consents_table.c.expires_at.is_(None), consents_table.c.expires_at > now),
        )
        for person, purpose in connection.execute(query):
            if person in wanted:
                granted[person].add(purpose)
        return granted

    def _objections_of(self, connection: Connection, wanted: set[str]) -> dict[str, set[str]]:
        """Per person, the tags objected to (``*``: all profiling): their own objections and
        those of every person whose events were merged into theirs."""
        objected: dict[str, set[str]] = defaultdict(set)
        by_objector: dict[str, set[str]] = defaultdict(set)
        # Objections are few, events many: the persons merged in are found from the objectors
        # through the index on origin_person_id, never by reading every event of the chunk.
        for person, tag_id in connection.execute(
            select(objections_table.c.person_id, objections_table.c.tag_id)
        ):
            by_objector[person].add(tag_id)
            if person in wanted:
                objected[person].add(tag_id)
        objectors = sorted(by_objector)
        for start in range(0, len(objectors), CHUNK):
            merged_in = (
                select(events_table.c.person_id, events_table.c.origin_person_id)
                .where(
                    events_table.c.origin_person_id.in_(objectors[start : start + CHUNK]),
                    events_table.c.person_id != events_table.c.origin_person_id,
                )
                .distinct()
            )
            for person, origin in connection.execute(merged_in):
                if person in wanted:
                    objected[person] |= by_objector[origin]
        return objected

    def reevaluate_each(
        self, connection: Connection, persons: Iterable[str], *, afresh: Collection[str] = ()
    ) -> None:
        """:meth:`reevaluate` one person at a time, with :func:`guardrails.assign_tags`: slow
        (about a millisecond a person), kept as the reference the set-based path must equal."""
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
                changes = [
                    TagChange(tag_id, ChangeKind.REMOVED, gone) for tag_id in sorted(carried)
                ]
            else:
                latest = max(e.occurred_at for e in events)
                decision = assign_tags(
                    rules,
                    profile,
                    evidence_counts={
                        r.id: evidence_count(r, profile, len(events)) for r in rules.rules
                    },
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
        self._publish(connection, bodies, now)

    def _publish(
        self, connection: Connection, bodies: Sequence[events_pb2.TagChanged], now: datetime
    ) -> None:
        """Put tag changes on tagging's log, and count them."""
        self.outbox.append(connection, bodies, occurred_at=now)
        if self._tag_changes is not None:
            for body in bodies:
                self._tag_changes.add(
                    1,
                    {
                        "tag": body.tag_id,
                        "change": events_pb2.TagChange.Name(body.change),
                        "reason": body.reason,
                    },
                )

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
            connection.execute(insert(tags_table), [_tag_row(person, t) for t in tags])
        if suppressed:
            connection.execute(
                insert(suppressed_table), [_suppressed_row(person, s) for s in suppressed]
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


_GC_LOCK: Final = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch builds and drops many objects.

    Profiles and tags are plain trees that reference counting frees; but with 100,000 profiles
    alive the collector's full passes, triggered by the allocations themselves, took a third of
    a population's re-evaluation. Nested and concurrent pauses are counted; the collector runs
    again (if it ran before) when the last one ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _GC_LOCK:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


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


def _among(persons: list[str]) -> Selector:
    def selector(column: Any) -> ColumnElement[bool]:
        condition: ColumnElement[bool] = column.in_(persons)
        return condition

    return selector


def _tag_row(person: str, tag: AssignedTag) -> dict[str, Any]:
    return {
        "person_id": person,
        "tag_id": tag.tag_id,
        "rule_set_version": tag.rule_set_version,
        "purpose": tag.purpose,
        "category": tag.category,
        "description": tag.description,
        "condition": tag.condition,
        "field_values": {
            "values": dict(tag.field_values),
            "rule_id": tag.rule_id,
            "confirmed_at": tag.confirmed_at.isoformat(),
        },
        "evidence_count": tag.evidence_count,
        "priority": tag.priority,
        "assigned_at": tag.assigned_at,
        "expires_at": tag.expires_at,
    }


def _suppressed_row(person: str, suppressed: SuppressedTag) -> dict[str, Any]:
    return {
        "person_id": person,
        "tag_id": suppressed.tag_id,
        "priority": suppressed.priority,
        "evidence_count": suppressed.evidence_count,
        "reason": suppressed.reason,
    }


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    seconds, micros = divmod(microseconds(moment), 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


__all__ = ["PRODUCER", "PersonTags", "TaggingService"]
