"""Tags follow what happens to persons elsewhere in the suite: merges fold profiles together,
unmerges split them again, tags lapse at their TTL, erasure leaves nothing behind and a withdrawal
takes away only the tags gated on the purpose withdrawn."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import MetaData, select
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.config import Settings
from services.common.db import for_writes, make_engine
from services.common.migrations import upgrade
from services.common.outbox import Outbox
from services.runtime import RunningSuite
from services.tagging.service import TaggingService
from services.tagging.store import OUTBOX_TABLES, PRODUCER

T = common_pb2
C = consent_pb2
G = tagging_pb2
NOW = datetime.now(UTC)

RULES = """
tag_budget: 5
k_floor: 10
tags:
  - id: big_spender
    category: value
    description: Spent 250 or more in the last 90 days
    condition: p.spend_90d >= 250.0
    ttl: 30d
    priority: 20
  - id: frequent_visitor
    category: engagement
    description: Six or more visits in the last 90 days
    condition: p.events_90d >= 6
    min_evidence: 6
    ttl: 30d
    priority: 10
  - id: outdoor_fan
    category: affinity
    description: Mostly browses outdoor gear
    condition: p.category_affinity["outdoor"] > 0.5
    ttl: 30d
    priority: 5
  - id: offer_reminder
    category: engagement
    description: Reminded of offers in the categories browsed
    purpose: marketing
    condition: p.events_30d >= 1
    ttl: 14d
    priority: 1
"""


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    settings = Settings.from_env(
        {"STEWARD_DATA_DIR": str(tmp_path / "data"), "STEWARD_DATABASE_URL": db_url}
    )
    return dataclasses.replace(settings, port=0)


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite]) -> RunningSuite:
    # start_services, not start_suite: `-m suite` runs these cascades on JetStream as well.
    return start_services("consent", "identity", "tagging")


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        tagging_pb2_grpc.TaggingServiceStub(channel).PutRuleSet(
            G.PutRuleSetRequest(yaml=RULES), timeout=10
        )
        yield channel


@pytest.fixture
def tagging_db(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.db_url("tagging"))
    yield engine
    engine.dispose()


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def shopper(
    channel: grpc.Channel, name: str, purposes: tuple[str, ...], *, spend: float, hours_ago: int
) -> str:
    """A person who granted ``purposes``, then bought once and viewed twice (all outdoor)."""
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    answer = consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(
                identifiers=[
                    T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"{name}@example.org")
                ]
            ),
            decisions=[
                C.DecisionInput(
                    purpose=purpose, decision=T.DECISION_GRANTED, policy_version="2026-01"
                )
                for purpose in purposes
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(NOW - timedelta(days=10)),
        ),
        timeout=10,
    )
    events = [
        T.BehaviourEvent(
            event_id=f"{name}-{n}",
            person_id=answer.person_id,
            type=T.EVENT_TYPE_PURCHASE if n == 0 else T.EVENT_TYPE_VIEW,
            item_id=f"{name}-item-{n}",
            category="outdoor",
            value=spend if n == 0 else 0.0,
            channel="web",
            occurred_at=stamp(NOW - timedelta(hours=hours_ago, minutes=n)),
        )
        for n in range(3)
    ]
    accepted = consent.Collect(C.CollectRequest(events=events), timeout=10)
    assert accepted.accepted == 3
    return answer.person_id


def profile(channel: grpc.Channel, person: str) -> tagging_pb2.Profile | None:
    try:
        return (
            tagging_pb2_grpc.TaggingServiceStub(channel)
            .GetProfile(G.GetProfileRequest(person_id=person), timeout=10)
            .profile
        )
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def spend_and_events(channel: grpc.Channel, person: str) -> tuple[float, int] | None:
    found = profile(channel, person)
    return None if found is None else (found.spend_90d, found.events_90d)


def tags_answer(channel: grpc.Channel, person: str) -> tagging_pb2.GetTagsResponse:
    return tagging_pb2_grpc.TaggingServiceStub(channel).GetTags(
        G.GetTagsRequest(person_id=person), timeout=10
    )


def tag_ids(channel: grpc.Channel, person: str) -> list[str]:
    return sorted(tag.tag_id for tag in tags_answer(channel, person).tags)


def tag_changes(channel: grpc.Channel, person: str) -> list[tuple[str, int, str]]:
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="tagging", consumer="test", stop_at_end=True),
        timeout=10,
    )
    return [
        (change.tag_id, change.change, change.reason)
        for change in (reply.envelope.tag_changed for reply in log)
        if change.person_id == person
    ]


ALONE = (150.0, 3)
"""Spend and events in 90 days of each person of the merged pair on their own."""


def merged_pair(channel: grpc.Channel) -> tuple[identity_pb2.MergeRecord, str, str]:
    """Two persons with profiling consent and 150 spend each, the younger of whom objected to
    ``outdoor_fan``, merged by an operator (the older, ann, survives)."""
    ann = shopper(channel, "ann", ("profiling",), spend=150.0, hours_ago=30)
    bob = shopper(channel, "bob", ("profiling",), spend=150.0, hours_ago=20)
    eventually(lambda: spend_and_events(channel, ann) == spend_and_events(channel, bob) == ALONE)
    eventually(lambda: tag_ids(channel, ann) == tag_ids(channel, bob) == ["outdoor_fan"])
    tagging_pb2_grpc.TaggingServiceStub(channel).ObjectToTag(
        G.ObjectToTagRequest(person_id=bob, tag_id="outdoor_fan", reason="not me"), timeout=10
    )
    merge = (
        identity_pb2_grpc.IdentityServiceStub(channel)
        .Merge(identity_pb2.MergeRequest(person_ids=[ann, bob], reason="same customer"), timeout=10)
        .merge
    )
    assert merge.surviving_person_id == ann and list(merge.absorbed_person_ids) == [bob]
    return merge, ann, bob


def test_merge_folds_both_persons_events_into_the_survivors_profile_and_tags(
    channel: grpc.Channel,
) -> None:
    _merge, ann, bob = merged_pair(channel)

    eventually(lambda: spend_and_events(channel, ann) == (300.0, 6))
    # Neither 150 nor three events were enough alone; bob's objection holds for the merged person.
    eventually(lambda: tag_ids(channel, ann) == ["big_spender", "frequent_visitor"])
    assert profile(channel, bob) is None
    assert tag_ids(channel, bob) == []
    changes = tag_changes(channel, ann)
    assert ("big_spender", events_pb2.TAG_CHANGE_ASSIGNED, "condition holds") in changes
    assert ("frequent_visitor", events_pb2.TAG_CHANGE_ASSIGNED, "condition holds") in changes
    assert ("outdoor_fan", events_pb2.TAG_CHANGE_REMOVED, "objection") in changes


def test_unmerge_recomputes_each_person_from_their_own_events(channel: grpc.Channel) -> None:
    merge, ann, bob = merged_pair(channel)
    eventually(lambda: tag_ids(channel, ann) == ["big_spender", "frequent_visitor"])

    restored = (
        identity_pb2_grpc.IdentityServiceStub(channel)
        .Unmerge(identity_pb2.UnmergeRequest(merge_id=merge.merge_id, reason="wrong"), timeout=10)
        .restored_person_ids
    )
    assert list(restored) == [bob]

    eventually(lambda: spend_and_events(channel, ann) == spend_and_events(channel, bob) == ALONE)
    # Tags confirmed by bob's events do not linger on ann until their TTL; bob's objection and
    # consent are his own again.
    eventually(lambda: tag_ids(channel, ann) == ["outdoor_fan"])
    eventually(lambda: any(s.tag_id == "outdoor_fan" for s in tags_answer(channel, bob).objections))
    assert tag_ids(channel, bob) == []
    changes = tag_changes(channel, ann)
    assert ("big_spender", events_pb2.TAG_CHANGE_REMOVED, "unmerged") in changes
    assert ("frequent_visitor", events_pb2.TAG_CHANGE_REMOVED, "unmerged") in changes


def test_erasure_deletes_every_tagging_row_about_the_person(
    channel: grpc.Channel, tagging_db: Engine
) -> None:
    person = shopper(channel, "cy", ("profiling", "marketing"), spend=300.0, hours_ago=5)
    other = shopper(channel, "dee", ("profiling",), spend=300.0, hours_ago=5)
    eventually(lambda: tag_ids(channel, person) == ["big_spender", "offer_reminder", "outdoor_fan"])
    eventually(lambda: tag_ids(channel, other) == ["big_spender", "outdoor_fan"])
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    tagging.ObjectToTag(
        G.ObjectToTagRequest(person_id=person, tag_id="outdoor_fan", reason="not me"), timeout=10
    )
    tagging.PutRuleSet(
        G.PutRuleSetRequest(yaml=RULES.replace("tag_budget: 5", "tag_budget: 1")), timeout=10
    )
    tables = tables_mentioning(tagging_db, person)
    assert {
        "tagging_events",
        "tagging_consents",
        "tagging_profiles",
        "tagging_tags",
        "tagging_suppressed",
        "tagging_objections",
    } <= set(tables)

    consent_pb2_grpc.ConsentServiceStub(channel).EraseSubject(
        C.EraseSubjectRequest(subject=T.PersonRef(person_id=person), reason="ticket 42"), timeout=10
    )
    eventually(lambda: not tables_mentioning(tagging_db, person))
    assert tag_ids(channel, person) == []
    assert profile(channel, person) is None
    assert tag_ids(channel, other) == ["big_spender"]


def tables_mentioning(engine: Engine, person: str) -> list[str]:
    """The tagging tables (all but the outbox, which is the log itself) with a row naming
    ``person`` anywhere, JSON columns included."""
    metadata = MetaData()
    metadata.reflect(engine)
    found = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            if not table.name.startswith("tagging_") or table.name == OUTBOX_TABLES.outbox.name:
                continue
            if any(person in repr(tuple(row)) for row in connection.execute(select(table))):
                found.append(table.name)
    return found


def test_withdrawing_marketing_removes_only_its_tags_and_profiling_removes_all(
    channel: grpc.Channel,
) -> None:
    person = shopper(channel, "eve", ("profiling", "marketing"), spend=300.0, hours_ago=5)
    eventually(lambda: tag_ids(channel, person) == ["big_spender", "offer_reminder", "outdoor_fan"])

    withdraw(channel, person, "marketing")
    eventually(lambda: tag_ids(channel, person) == ["big_spender", "outdoor_fan"])
    assert spend_and_events(channel, person) == (300.0, 3)
    changes = tag_changes(channel, person)
    assert ("offer_reminder", events_pb2.TAG_CHANGE_REMOVED, "withdrawal:marketing") in changes
    removed = [tag for tag, kind, _ in changes if kind == events_pb2.TAG_CHANGE_REMOVED]
    assert removed == ["offer_reminder"]

    withdraw(channel, person, "profiling")
    eventually(lambda: tag_ids(channel, person) == [])
    assert profile(channel, person) is None
    assert {
        (tag, reason)
        for tag, kind, reason in tag_changes(channel, person)
        if kind == events_pb2.TAG_CHANGE_REMOVED
    } == {
        ("offer_reminder", "withdrawal:marketing"),
        ("big_spender", "withdrawal:profiling"),
        ("outdoor_fan", "withdrawal:profiling"),
    }


def withdraw(channel: grpc.Channel, person: str, purpose: str) -> None:
    consent_pb2_grpc.ConsentServiceStub(channel).RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(person_id=person),
            decisions=[
                C.DecisionInput(
                    purpose=purpose, decision=T.DECISION_WITHDRAWN, policy_version="2026-01"
                )
            ],
            source=C.CONSENT_SOURCE_APP,
        ),
        timeout=10,
    )


# TTL: the service on its own database, with a clock the test moves -------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


TTL_RULES = """
k_floor: 10
tags:
  - id: recent_visitor
    category: engagement
    description: Visited in the last day
    condition: p.events_90d >= 1
    ttl: 12h
"""


def consent_envelope(seq: int, person: str) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        id=f"consent-{seq}",
        seq=seq,
        producer="consent",
        consent_changed=events_pb2.ConsentChanged(
            person_id=person, purpose="profiling", decision=T.DECISION_GRANTED, allowed=True
        ),
    )


def visit_envelope(seq: int, person: str, at: datetime) -> events_pb2.Envelope:
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
            occurred_at=stamp(at),
            purposes=["profiling"],
        ),
    )


def test_a_tag_expires_at_its_ttl_unless_new_evidence_renews_it(engine: Engine) -> None:
    upgrade(engine, "tagging")
    clock = Clock(datetime(2026, 3, 2, 12, tzinfo=UTC))
    outbox = Outbox(PRODUCER, OUTBOX_TABLES)
    service = TaggingService(engine, outbox, clock=clock)
    service.put_rule_set(TTL_RULES, "test")
    person = "p-ttl"
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, consent_envelope(1, person))
        service.apply_consent_envelope(
            connection, visit_envelope(2, person, clock.now - timedelta(hours=1))
        )
    [tag] = service.tags_of(person).tags
    assert tag.tag_id == "recent_visitor"
    assert tag.expires_at == clock.now + timedelta(hours=11)

    clock.now += timedelta(hours=6)  # a new visit before the expiry renews the tag
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, visit_envelope(3, person, clock.now))
    [renewed] = service.tags_of(person).tags
    assert renewed.expires_at == clock.now + timedelta(hours=12)
    assert renewed.assigned_at == tag.assigned_at

    clock.now += timedelta(hours=12, minutes=1)  # past the TTL with no new evidence
    assert service.tags_of(person).tags == []
    assert service.expire() == 1
    assert service.tags_of(person).tags == []
    assert service.expire() == 0
    with engine.connect() as connection:
        changes = [
            (envelope.tag_changed.change, envelope.tag_changed.reason)
            for envelope in outbox.read(connection, 1, 100)
        ]
    assert changes == [
        (events_pb2.TAG_CHANGE_ASSIGNED, "condition holds"),
        (events_pb2.TAG_CHANGE_RENEWED, "new evidence"),
        (events_pb2.TAG_CHANGE_EXPIRED, "no new evidence"),
    ]


def test_a_new_rule_set_and_the_consumer_can_reevaluate_the_same_persons_at_once(
    engine: Engine,
) -> None:
    upgrade(engine, "tagging")
    service = TaggingService(engine, Outbox(PRODUCER, OUTBOX_TABLES))
    service.put_rule_set(TTL_RULES, "test")
    persons = [f"p-{n}" for n in range(10)]
    with engine.begin() as connection:
        for seq, person in enumerate(persons, start=1):
            service.apply_consent_envelope(connection, consent_envelope(seq, person))
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            for seq in range(100, 160):
                at = datetime.now(UTC) - timedelta(minutes=seq)
                with for_writes(engine).begin() as connection:  # as the consumer does
                    envelope = visit_envelope(seq, persons[seq % len(persons)], at)
                    service.apply_consent_envelope(connection, envelope)
        except BaseException as error:
            failures.append(error)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        for _ in range(8):
            service.put_rule_set(TTL_RULES, "test")
    finally:
        consumer.join()
    assert failures == []
    assert all(service.tags_of(person).tags for person in persons)


def test_unmerge_hands_events_back_even_after_the_survivor_was_merged_again(
    channel: grpc.Channel,
) -> None:
    zed = shopper(channel, "zed", ("profiling",), spend=150.0, hours_ago=40)  # the oldest
    merge, ann, bob = merged_pair(channel)
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    later = identity.Merge(
        identity_pb2.MergeRequest(person_ids=[zed, ann], reason="same household account"),
        timeout=10,
    ).merge
    assert later.surviving_person_id == zed
    eventually(lambda: spend_and_events(channel, zed) == (450.0, 9))

    identity.Unmerge(
        identity_pb2.UnmergeRequest(merge_id=merge.merge_id, reason="wrong"), timeout=10
    )

    # bob's events come back to him from zed, who now holds ann's and his own.
    eventually(lambda: spend_and_events(channel, bob) == ALONE)
    eventually(lambda: spend_and_events(channel, zed) == (300.0, 6))
