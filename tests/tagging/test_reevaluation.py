"""The set-based re-evaluation (bulk statements, vectorised conditions, guardrails on arrays)
decides exactly what re-evaluating each person on their own decides: the same profiles, tags,
explanations, suppressions and TagChanged envelopes, in the same order."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2

from services.common.migrations import upgrade
from services.common.outbox import Outbox
from services.common.times import utc
from services.tagging.service import TaggingService, lock_persons
from services.tagging.store import (
    OUTBOX_TABLES,
    PRODUCER,
    consents_table,
    events_table,
    objections_table,
    profiles_table,
    suppressed_table,
    tags_table,
)

T = common_pb2
T0 = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
CATEGORIES = ("outdoor", "kitchen", "books", "toys")
CHANNELS = ("web", "app", "pos")

RULES_A = """
tag_budget: 2
k_floor: 10
tags:
  - id: big_spender
    category: value
    description: Spent 200 or more in 90 days.
    condition: p.spend_90d >= 200 && p.orders_90d >= 1
    min_evidence: 2
    ttl: 20d
    priority: 50
  - id: busy
    category: engagement
    description: Many visits lately.
    condition: p.events_30d >= 4
    min_evidence: 4
    evidence_window: 30d
    ttl: 10d
    priority: 20
  - id: outdoor_fan
    category: affinity
    description: Mostly outdoor gear.
    condition: p.category_affinity["outdoor"] > 0.3
    ttl: 15d
    priority: 20
  - id: cart_reminder
    category: engagement
    description: Leaves carts behind.
    purpose: marketing
    condition: p.cart_additions_30d >= 1
    ttl: 7d
    priority: 30
  - id: gone_quiet
    category: lifecycle
    description: Not seen for a month or more.
    condition: p.lifecycle == "at_risk" || p.lifecycle == "churned"
    min_evidence: 3
    evidence_window: lifetime
    ttl: 120d
    priority: 40
  - id: weekly_visitor
    category: habit
    description: Visited this week.
    condition: p.events_7d >= 1
    evidence_window: 7d
    ttl: 3d
    priority: 5
  - id: kitchen_or_books
    category: affinity
    description: Kitchen or books.
    condition: >-
      p.category_views["kitchen"] + p.category_views["books"] > 1.5
      || size(p.category_affinity) >= 3
    ttl: 12h
    priority: 20
"""

# Priorities changed, busy removed, a new rule, cart_reminder no longer gated on marketing,
# a budget of 3.
RULES_B = """
tag_budget: 3
k_floor: 10
tags:
  - id: big_spender
    category: value
    description: Spent 150 or more in 90 days.
    condition: p.spend_90d >= 150
    min_evidence: 1
    ttl: 30d
    priority: 10
  - id: outdoor_fan
    category: affinity
    description: Mostly outdoor gear.
    condition: p.category_affinity["outdoor"] > 0.25
    ttl: 15d
    priority: 60
  - id: cart_reminder
    category: engagement
    description: Leaves carts behind.
    condition: p.cart_additions_30d >= 1
    ttl: 7d
    priority: 30
  - id: gone_quiet
    category: lifecycle
    description: Not seen for a month or more.
    condition: p.lifecycle in ["at_risk", "churned"]
    evidence_window: lifetime
    ttl: 120d
    priority: 40
  - id: app_user
    category: habit
    description: Uses the app.
    condition: p.channel_events_90d["app"] >= 2
    ttl: 20d
    priority: 30
  - id: weekly_visitor
    category: habit
    description: Visited this week.
    condition: p.events_7d >= 1
    evidence_window: 7d
    ttl: 3d
    priority: 5
"""


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def random_events(
    rng: random.Random, person: str, origin: str, now: datetime, count: int, days: float
) -> list[dict[str, Any]]:
    rows = []
    for _ in range(count):
        kind = rng.choice(
            (
                T.EVENT_TYPE_VIEW,
                T.EVENT_TYPE_VIEW,
                T.EVENT_TYPE_DWELL,
                T.EVENT_TYPE_SEARCH,
                T.EVENT_TYPE_ADD_TO_CART,
                T.EVENT_TYPE_PURCHASE,
            )
        )
        rows.append(
            {
                "event_id": f"e-{rng.getrandbits(64):016x}",
                "person_id": person,
                "origin_person_id": origin,
                "type": int(kind),
                "item_id": f"sku-{rng.randrange(30)}",
                "category": rng.choice(CATEGORIES),
                "value": round(rng.uniform(10, 180), 2) if kind == T.EVENT_TYPE_PURCHASE else 0.0,
                "dwell_ms": rng.randrange(1000, 60_000) if kind == T.EVENT_TYPE_DWELL else 0,
                "quantity": 1,
                "channel": rng.choice(CHANNELS),
                # Now and then an event from a clock running ahead.
                "occurred_at": now
                - timedelta(seconds=rng.uniform(-600 if rng.random() < 0.03 else 0, days * 86400)),
            }
        )
    return rows


def populate(engine: Engine, rng: random.Random, persons: list[str], now: datetime) -> None:
    """Events (some merged in from other persons, who objected to things), consents (some
    expired, some marketing) and objections."""
    events, consents, objections = [], [], []
    for n, person in enumerate(persons):
        recent_days = rng.choice((3.0, 20.0, 45.0, 200.0))
        events += random_events(rng, person, person, now, rng.randrange(1, 12), recent_days)
        if n % 9 == 0:  # merged: events collected for another person, who objected
            origin = f"{person}-absorbed"
            events += random_events(rng, person, origin, now, rng.randrange(1, 5), 30.0)
            objections.append(
                {"person_id": origin, "tag_id": rng.choice(("outdoor_fan", "*", "busy"))}
            )
        if rng.random() < 0.92:
            expired = rng.random() < 0.05
            consents.append(
                {
                    "person_id": person,
                    "purpose": "profiling",
                    "allowed": True,
                    "expires_at": now - timedelta(days=1) if expired else None,
                }
            )
        if rng.random() < 0.5:
            consents.append(
                {
                    "person_id": person,
                    "purpose": "marketing",
                    "allowed": rng.random() < 0.8,
                    "expires_at": now + timedelta(days=rng.choice((1, 30))),
                }
            )
        if rng.random() < 0.1:
            tag = rng.choice(("big_spender", "outdoor_fan", "busy", "gone_quiet", "*"))
            objections.append({"person_id": person, "tag_id": tag})
    unique_objections = {(o["person_id"], o["tag_id"]): o for o in objections}
    with engine.begin() as connection:
        connection.execute(insert(events_table), events)
        connection.execute(insert(consents_table), [{**c, "ledger_seq": 0} for c in consents])
        connection.execute(
            insert(objections_table),
            [{**o, "reason": "", "recorded_at": now} for o in unique_objections.values()],
        )


def snapshot(service: TaggingService, connection: Connection, after_seq: int) -> dict[str, Any]:
    """Everything a re-evaluation writes: profiles, tags, suppressions, TagChanged."""

    def rows(table: Any) -> list[tuple[Any, ...]]:
        result = []
        for row in connection.execute(select(table)):
            result.append(
                tuple(utc(value) if isinstance(value, datetime) else value for value in row)
            )
        return sorted(result, key=repr)

    changes = [
        json_format.MessageToDict(envelope.tag_changed)
        for envelope in service.outbox.read(connection, after_seq + 1, 1_000_000)
    ]
    return {
        "profiles": rows(profiles_table),
        "tags": rows(tags_table),
        "suppressed": rows(suppressed_table),
        "changes": changes,
    }


def outcome(service: TaggingService, run: Callable[[Connection], None]) -> dict[str, Any]:
    """What ``run`` writes, rolled back afterwards."""
    with service.engine.connect() as connection:
        transaction = connection.begin()
        try:
            lock_persons(connection)
            before = service.outbox.last_seq(connection)
            run(connection)
            return snapshot(service, connection, before)
        finally:
            transaction.rollback()


def assert_same(each: dict[str, Any], together: dict[str, Any]) -> None:
    for part in ("profiles", "tags", "suppressed", "changes"):
        assert together[part] == each[part], part
    assert each["changes"], "the scenario changed nothing: it tests nothing"


def profile_persons(connection: Connection) -> list[str]:
    return list(connection.execute(select(profiles_table.c.person_id)).scalars())


@pytest.mark.parametrize("seed", [1, 2])
def test_the_set_based_path_decides_what_the_per_person_path_decides(
    engine: Engine, seed: int
) -> None:
    upgrade(engine, "tagging")
    rng = random.Random(seed)
    clock = Clock(T0)
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES), clock=clock)
    persons = [f"p-{rng.getrandbits(48):012x}" for _ in range(140)]
    populate(engine, rng, persons, T0)
    service.put_rule_set(RULES_A, "test")  # nobody has a profile yet: stores the rule set

    # 1. Nobody carries a tag yet: profiles computed, tags assigned, suppressed by the budget.
    first = outcome(service, lambda c: service.reevaluate_each(c, persons))
    assert_same(first, outcome(service, lambda c: service.reevaluate(c, persons)))
    assert first["tags"] and first["suppressed"]
    with service.outbox.begin(engine) as connection:
        service.reevaluate(connection, persons)

    # 2. Twelve days on: new events for some, withdrawals, a profiling withdrawal (events gone,
    # tags still carried), new objections; unmerged persons are decided afresh.
    clock.now = T0 + timedelta(days=12)
    more = [e for p in persons[::3] for e in random_events(rng, p, p, clock.now, 3, 4.0)]
    withdrawn = persons[1::10]
    with engine.begin() as connection:
        connection.execute(insert(events_table), more)
        connection.execute(
            update(consents_table)
            .where(consents_table.c.person_id.in_(persons[::7]))
            .where(consents_table.c.purpose == "marketing")
            .values(allowed=False)
        )
        connection.execute(
            update(consents_table)
            .where(consents_table.c.person_id.in_(withdrawn))
            .where(consents_table.c.purpose == "profiling")
            .values(allowed=False)
        )
        connection.execute(delete(events_table).where(events_table.c.person_id.in_(withdrawn)))
        connection.execute(
            insert(objections_table),
            [
                {"person_id": p, "tag_id": "weekly_visitor", "reason": "", "recorded_at": T0}
                for p in persons[5::11]
            ],
        )
    afresh = set(persons[2::13])
    second = outcome(service, lambda c: service.reevaluate_each(c, persons, afresh=afresh))
    assert_same(second, outcome(service, lambda c: service.reevaluate(c, persons, afresh=afresh)))
    kinds = {change["change"] for change in second["changes"]}
    assert {"TAG_CHANGE_RENEWED", "TAG_CHANGE_EXPIRED", "TAG_CHANGE_REMOVED"} <= kinds
    with service.outbox.begin(engine) as connection:
        service.reevaluate(connection, persons, afresh=afresh)

    # 3. A new rule set on the stored profiles (fresh: computed at this clock), against
    # re-evaluating each person from their events.
    def each_with_b(connection: Connection) -> None:
        service.store_rule_set(connection, RULES_B, "test")
        service.reevaluate_each(connection, profile_persons(connection))

    def stored_with_b(connection: Connection) -> None:
        service.store_rule_set(connection, RULES_B, "test")
        assert service.reevaluate_stored(connection) == len(profile_persons(connection))

    third = outcome(service, each_with_b)
    assert_same(third, outcome(service, stored_with_b))
    assert any(change["reason"] == "rule removed" for change in third["changes"])
    service.put_rule_set(RULES_B, "test")

    # 4. Three weeks later, without new evidence: tags lapse.
    clock.now += timedelta(days=21)
    fourth = outcome(service, lambda c: service.reevaluate_each(c, persons))
    assert_same(fourth, outcome(service, lambda c: service.reevaluate(c, persons)))
    assert any(change["change"] == "TAG_CHANGE_EXPIRED" for change in fourth["changes"])


def test_put_rule_set_reevaluates_in_pages_of_stored_profiles(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Pages of stored profiles split the population by person id ranges; the outcome is
    that of one page."""
    upgrade(engine, "tagging")
    rng = random.Random(3)
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES), clock=Clock(T0))
    persons = [f"p-{rng.getrandbits(48):012x}" for _ in range(60)]
    populate(engine, rng, persons, T0)
    service.put_rule_set(RULES_A, "test")
    with service.outbox.begin(engine) as connection:
        service.reevaluate(connection, persons)

    def with_b(connection: Connection) -> None:
        service.store_rule_set(connection, RULES_B, "test")
        service.reevaluate_stored(connection)

    whole = outcome(service, with_b)
    monkeypatch.setattr("services.tagging.service.STORED_PAGE", 7)
    assert outcome(service, with_b) == whole
    assert whole["tags"]


EXAMPLE = Path(__file__).resolve().parents[2] / "rules" / "example.yaml"


def test_the_examples_churned_tag_is_granted_to_a_customer_gone_quiet(engine: Engine) -> None:
    """A churned person has no events in the last 90 days by definition: the example's churned
    tag counts its evidence over the lifetime, so it can actually be granted."""
    upgrade(engine, "tagging")
    clock = Clock(T0)
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES), clock=clock)
    rng = random.Random(4)
    gone_quiet, one_visit, active = "p-gone-quiet", "p-one-visit", "p-active"
    events = [
        *random_events(rng, gone_quiet, gone_quiet, T0 - timedelta(days=100), 5, 40.0),
        *random_events(rng, one_visit, one_visit, T0 - timedelta(days=100), 1, 1.0),
        *random_events(rng, active, active, T0, 5, 20.0),
    ]
    with engine.begin() as connection:
        connection.execute(insert(events_table), events)
        connection.execute(
            insert(consents_table),
            [
                {"person_id": p, "purpose": "profiling", "allowed": True, "ledger_seq": 0}
                for p in (gone_quiet, one_visit, active)
            ],
        )
    with service.outbox.begin(engine) as connection:
        service.reevaluate(connection, [gone_quiet, one_visit, active])
    service.put_rule_set(EXAMPLE.read_text(), "test")  # on the stored profiles

    assert service.profile_of(gone_quiet)["events_90d"] == 0
    (churned,) = [tag for tag in service.tags_of(gone_quiet).tags if tag.tag_id == "churned"]
    newest = max(utc(e["occurred_at"]) for e in events if e["person_id"] == gone_quiet)
    assert churned.evidence_count == 5
    assert churned.field_values == {"lifecycle": "churned"}
    assert churned.expires_at == newest + timedelta(days=180)
    # One visit long ago is not a customer who left; an active one has not left.
    assert service.profile_of(one_visit)["lifecycle"] == "churned"
    assert "churned" not in {tag.tag_id for tag in service.tags_of(one_visit).tags}
    assert "churned" not in {tag.tag_id for tag in service.tags_of(active).tags}

    # The per-person path agrees.
    fresh = outcome(
        service, lambda c: service.reevaluate_each(c, [gone_quiet], afresh=[gone_quiet])
    )
    assert any(row[1] == "churned" for row in fresh["tags"] if row[0] == gone_quiet)


def test_a_consumer_batch_reevaluates_each_person_it_touched_once(engine: Engine) -> None:
    """Envelopes are only recorded; the batch's end re-evaluates each person once, so a burst of
    one person's events makes one decision (one ASSIGNED), not one per event."""
    upgrade(engine, "tagging")
    clock = Clock(T0)
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES), clock=clock)
    service.put_rule_set(RULES_A, "test")

    def visit(seq: int, person: str) -> events_pb2.Envelope:
        stamp = Timestamp()
        stamp.FromDatetime(T0 - timedelta(minutes=seq))
        return events_pb2.Envelope(
            id=f"consent-{seq}",
            seq=seq,
            producer="consent",
            behaviour_recorded=events_pb2.BehaviourRecorded(
                person_id=person,
                event_id=f"visit-{seq}",
                type=T.EVENT_TYPE_VIEW,
                category="outdoor",
                channel="web",
                occurred_at=stamp,
                purposes=["profiling"],
            ),
        )

    grant = [
        events_pb2.Envelope(
            id=f"consent-{n}",
            seq=n,
            producer="consent",
            consent_changed=events_pb2.ConsentChanged(
                person_id=person, purpose="profiling", decision=T.DECISION_GRANTED, allowed=True
            ),
        )
        for n, person in enumerate(("p-ann", "p-bob"), start=1)
    ]
    batch = [*grant, *(visit(seq, ("p-ann", "p-bob")[seq % 2]) for seq in range(3, 13))]
    with service.outbox.begin(engine) as connection:
        for envelope in batch:
            service.ingest_consent_envelope(connection, envelope)
        assert service.outbox.last_seq(connection) == 0  # nothing decided yet
        service.end_batch(connection, batch)
        changes = [
            (e.tag_changed.person_id, e.tag_changed.tag_id, e.tag_changed.change)
            for e in service.outbox.read(connection, 1, 100)
        ]
    # One decision per person: busy and outdoor_fan within the budget of 2, weekly_visitor
    # left out; no renewal per further event.
    assert changes == [
        (person, tag_id, kind)
        for person in ("p-ann", "p-bob")
        for tag_id, kind in (
            ("busy", events_pb2.TAG_CHANGE_ASSIGNED),
            ("outdoor_fan", events_pb2.TAG_CHANGE_ASSIGNED),
            ("weekly_visitor", events_pb2.TAG_CHANGE_SUPPRESSED),
        )
    ]
    assert service.profile_of("p-ann")["events_90d"] == 5
    assert [tag.tag_id for tag in service.tags_of("p-bob").tags] == ["busy", "outdoor_fan"]
