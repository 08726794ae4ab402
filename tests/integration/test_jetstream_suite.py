"""The whole suite with STEWARD_TRANSPORT=jetstream: events and withdrawals reach tagging and
recommend through NATS JetStream, and the consumers' acknowledgements still reach consent."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats.js.errors
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from sqlalchemy import select
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.config import Settings
from services.common.db import make_engine
from services.common.jetstream import JetStreamConnection, delete_streams
from services.common.outbox import Outbox
from services.consent.store import OUTBOX_TABLES
from services.runtime import RunningSuite, start_suite
from services.tagging.store import CONSUMER_TABLES
from tests.conftest import OUTDOOR_RULES, jetstream_environ

T = common_pb2
C = consent_pb2
G = tagging_pb2
R = recommend_pb2
NOW = datetime.now(UTC)


PRODUCERS = ("consent", "identity", "tagging")


@pytest.fixture
def prefix(nats_url: str) -> Iterator[str]:
    """This test's own streams, deleted once the suite (set up after this) has stopped."""
    name = f"suite{uuid.uuid4().hex[:10]}"
    yield name
    delete_streams(nats_url, name, PRODUCERS)


@pytest.fixture
def suite(prefix: str, nats_url: str, start_services: Callable[..., RunningSuite]) -> RunningSuite:
    return start_services(environ=jetstream_environ(nats_url, prefix))


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        tagging_pb2_grpc.TaggingServiceStub(channel).PutRuleSet(
            G.PutRuleSetRequest(yaml=OUTDOOR_RULES), timeout=10
        )
        recommend_pb2_grpc.RecommendServiceStub(channel).PutItems(
            R.PutItemsRequest(
                items=[
                    R.Item(item_id=f"tent-{n}", title=f"Tent {n}", category="outdoor", price=90.0)
                    for n in range(3)
                ]
            ),
            timeout=10,
        )
        yield channel


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def decide(channel: grpc.Channel, subject: T.PersonRef, decision: int, *purposes: str) -> str:
    return (
        consent_pb2_grpc.ConsentServiceStub(channel)
        .RecordConsent(
            C.RecordConsentRequest(
                subject=subject,
                decisions=[
                    C.DecisionInput(purpose=purpose, decision=decision, policy_version="2026-01")
                    for purpose in purposes
                ],
                source=C.CONSENT_SOURCE_WEB_BANNER,
                # Grants date from before the events collected under them; withdrawals are now.
                occurred_at=stamp(
                    NOW - timedelta(days=10) if decision == T.DECISION_GRANTED else NOW
                ),
            ),
            timeout=10,
        )
        .person_id
    )


def shopper(channel: grpc.Channel, name: str) -> str:
    """A person who granted profiling, marketing and personalisation, then viewed two tents."""
    email = T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"{name}@example.org")
    person = decide(
        channel,
        T.PersonRef(identifiers=[email]),
        T.DECISION_GRANTED,
        "profiling",
        "marketing",
        "personalisation",
    )
    events = [
        T.BehaviourEvent(
            event_id=f"{name}-{n}",
            person_id=person,
            type=T.EVENT_TYPE_VIEW,
            item_id=f"tent-{n}",
            category="outdoor",
            channel="web",
            occurred_at=stamp(NOW - timedelta(hours=2, minutes=n)),
        )
        for n in range(2)
    ]
    accepted = consent_pb2_grpc.ConsentServiceStub(channel).Collect(
        C.CollectRequest(events=events), timeout=10
    )
    assert accepted.accepted == 2
    return person


def tag_ids(channel: grpc.Channel, person: str) -> list[str]:
    tags = tagging_pb2_grpc.TaggingServiceStub(channel).GetTags(
        G.GetTagsRequest(person_id=person), timeout=10
    )
    return sorted(tag.tag_id for tag in tags.tags)


def held_items(channel: grpc.Channel, person: str) -> list[str]:
    export = recommend_pb2_grpc.RecommendServiceStub(channel).ExportPerson(
        R.ExportPersonRequest(person_id=person), timeout=10
    )
    return sorted(interaction.item_id for interaction in export.interactions)


Acknowledgements = Callable[[], tuple[int, dict[str, int]]]


@pytest.fixture
def acknowledgements(suite: RunningSuite, db_url: str) -> Iterator[Acknowledgements]:
    """Reads consent's last seq and each consumer's acknowledged seq as consent recorded it."""
    engine = make_engine(db_url)  # the suite's services share this test's database
    outbox = Outbox("consent", OUTBOX_TABLES)

    def read() -> tuple[int, dict[str, int]]:
        with engine.connect() as connection:
            acks = outbox.acknowledgements(connection)
            return outbox.last_seq(connection), {name: ack.seq for name, ack in acks.items()}

    yield read
    engine.dispose()


def stream_messages(nats_url: str, prefix: str, producer: str) -> list[tuple[str, bytes]]:
    """(subject, data) of every message left in the producer's stream."""
    connection = JetStreamConnection(nats_url, name="test")

    async def read(jetstream: JetStreamContext) -> list[tuple[str, bytes]]:
        stream = f"{prefix}_{producer}".upper()
        info = await jetstream.stream_info(stream)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                message = await jetstream.get_msg(stream, seq=seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted after a redaction
            found.append((message.subject or "", message.data or b""))
        return found

    try:
        return connection.call(read, timeout=30)
    finally:
        connection.close()


def stream_subjects(nats_url: str, prefix: str, producer: str) -> set[str]:
    return {subject for subject, _ in stream_messages(nats_url, prefix, producer)}


def test_a_collected_event_reaches_tagging_and_recommend_through_jetstream(
    channel: grpc.Channel, acknowledgements: Acknowledgements, nats_url: str, prefix: str
) -> None:
    person = shopper(channel, "ann")

    eventually(lambda: tag_ids(channel, person) == ["offer_reminder", "outdoor_fan"])
    eventually(lambda: held_items(channel, person) == ["tent-0", "tent-1"])

    assert {
        f"{prefix}.consent.consent_changed",
        f"{prefix}.consent.behaviour_recorded",
    } <= stream_subjects(nats_url, prefix, "consent")

    def acknowledged_everywhere() -> bool:
        last, acks = acknowledgements()
        return acks.get("tagging") == last and acks.get("recommend") == last

    eventually(acknowledged_everywhere)


def test_a_withdrawal_reaches_tagging_through_jetstream_and_is_acknowledged(
    channel: grpc.Channel, acknowledgements: Acknowledgements
) -> None:
    person = shopper(channel, "eve")
    eventually(lambda: tag_ids(channel, person) == ["offer_reminder", "outdoor_fan"])

    decide(channel, T.PersonRef(person_id=person), T.DECISION_WITHDRAWN, "marketing")
    withdrawn_at, _ = acknowledgements()

    eventually(lambda: tag_ids(channel, person) == ["outdoor_fan"])
    eventually(lambda: acknowledgements()[1].get("tagging", 0) >= withdrawn_at)
    # Tagging's own log (TagChanged) is relayed too, and still served by Subscribe.
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="tagging", consumer="test", stop_at_end=True),
        timeout=10,
    )
    removed = [
        (reply.envelope.tag_changed.tag_id, reply.envelope.tag_changed.reason)
        for reply in log
        if reply.envelope.tag_changed.person_id == person
        and reply.envelope.tag_changed.change == events_pb2.TAG_CHANGE_REMOVED
    ]
    assert removed == [("offer_reminder", "withdrawal:marketing")]


def test_services_apart_read_each_others_logs_through_jetstream_and_ack_where_they_run(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    def settings(name: str, **targets: str) -> Settings:
        base = Settings.from_env(
            {
                "STEWARD_DATA_DIR": str(tmp_path / name),
                **jetstream_environ(nats_url, prefix),
            }
        )
        return dataclasses.replace(base, port=0, **targets)  # type: ignore[arg-type]

    identity = start_suite(settings("identity"), ["identity"])
    consent = start_suite(settings("consent", identity_target=identity.target), ["consent"])
    tagging_settings = settings(
        "tagging", consent_target=consent.target, identity_target=identity.target
    )
    tagging = start_suite(tagging_settings, ["tagging"])
    consent_db = make_engine(settings("consent").db_url("consent"))
    tagging_db = make_engine(tagging_settings.db_url("tagging"))
    try:
        with grpc.insecure_channel(consent.target) as channel:
            person = decide(
                channel,
                T.PersonRef(
                    identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value="apart@x.org")]
                ),
                T.DECISION_GRANTED,
                "profiling",
            )
        assert person

        def tagging_cursor() -> int:
            cursors = CONSUMER_TABLES.cursors
            query = select(cursors.c.seq).where(
                cursors.c.consumer == "tagging", cursors.c.producer == "consent"
            )
            with tagging_db.connect() as connection:
                return int(connection.execute(query).scalar_one_or_none() or 0)

        def acknowledged_by_tagging() -> int:
            with consent_db.connect() as connection:
                acks = Outbox("consent", OUTBOX_TABLES).acknowledgements(connection)
            return acks["tagging"].seq if "tagging" in acks else 0

        eventually(lambda: tagging_cursor() >= 1)
        # Tagging's process read consent's log from NATS and told consent's process so.
        eventually(lambda: acknowledged_by_tagging() == tagging_cursor() >= 1)
    finally:
        tagging.stop(0)
        consent.stop(0)
        identity.stop(0)
        consent_db.dispose()
        tagging_db.dispose()


def test_an_erasure_leaves_nothing_naming_the_person_in_consents_and_identitys_streams(
    channel: grpc.Channel, nats_url: str, prefix: str
) -> None:
    person = shopper(channel, "zoe")
    eventually(lambda: held_items(channel, person) == ["tent-0", "tent-1"])
    naming = person.encode()
    assert any(naming in data for _, data in stream_messages(nats_url, prefix, "consent"))

    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    email = T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value="zoe@example.org")
    erasure = consent.EraseSubject(
        C.EraseSubjectRequest(subject=T.PersonRef(identifiers=[email]), reason="ticket 9"),
        timeout=10,
    ).erasure

    def done() -> bool:
        report = consent.GetErasure(
            C.GetErasureRequest(erasure_id=erasure.erasure_id), timeout=10
        ).erasure
        return report.state == C.ERASURE_STATE_DONE

    eventually(done, seconds=30)

    def nothing_named() -> bool:
        return not any(
            naming in data
            for producer in ("consent", "identity")
            for _, data in stream_messages(nats_url, prefix, producer)
        )

    eventually(nothing_named, seconds=30)
