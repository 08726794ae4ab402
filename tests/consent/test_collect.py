"""Consented collection over gRPC: drop reasons, consent timing, minimisation, the log, erasure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import inspect, text
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.config import Settings
from services.common.db import make_engine
from services.common.errors import read_error_details
from services.common.keyring import DecryptionError, Keyring, decrypt_field
from services.consent.keystore import KeyStore
from services.runtime import RunningSuite, start_suite

C = consent_pb2
T = common_pb2
NOW = datetime.now(UTC)
EMAIL = "Grace.Hopper@Example.net"
PHONE = "+44 7911 123456"


@pytest.fixture
def urls(tmp_path: Path, db_url: str) -> dict[str, str]:
    """Events in one database, the key store in another (so a backup of one lacks the other)."""
    keystore = f"sqlite:///{tmp_path / 'keystore.db'}"
    return {"STEWARD_DATABASE_URL": db_url, "STEWARD_KEYSTORE_DB_URL": keystore}


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite], urls: dict[str, str]) -> RunningSuite:
    return start_services("consent", "identity", environ=urls)


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


@pytest.fixture
def consent(channel: grpc.Channel) -> consent_pb2_grpc.ConsentServiceStub:
    return consent_pb2_grpc.ConsentServiceStub(channel)


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def email(value: str = EMAIL) -> list[common_pb2.Identifier]:
    return [T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=value)]


def decide(
    consent: consent_pb2_grpc.ConsentServiceStub,
    purpose: str,
    decision: int,
    at: datetime,
    *,
    expires: datetime | None = None,
    identifiers: list[common_pb2.Identifier] | None = None,
) -> str:
    answer = consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(identifiers=identifiers or email()),
            decisions=[
                C.DecisionInput(
                    purpose=purpose,
                    decision=decision,  # type: ignore[arg-type]
                    policy_version="2026-01",
                    expires_at=stamp(expires) if expires else None,
                )
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(at),
        ),
        timeout=10,
    )
    return answer.person_id


def event(event_id: str, at: datetime = NOW, **fields: object) -> common_pb2.BehaviourEvent:
    values: dict[str, object] = {
        "event_id": event_id,
        "identifiers": email(),
        "type": T.EVENT_TYPE_VIEW,
        "item_id": "sku-1",
        "category": "garden",
        "channel": "web",
        "occurred_at": stamp(at),
    }
    values.update(fields)
    return T.BehaviourEvent(**values)  # type: ignore[arg-type]


def collect(
    consent: consent_pb2_grpc.ConsentServiceStub, *events: common_pb2.BehaviourEvent
) -> list[consent_pb2.EventResult]:
    return list(consent.Collect(C.CollectRequest(events=events), timeout=10).results)


def log(channel: grpc.Channel, from_seq: int = 0) -> list[events_pb2.Envelope]:
    stub = events_pb2_grpc.EventLogServiceStub(channel)
    request = events_pb2.SubscribeRequest(
        producer="consent", consumer="test", from_seq=from_seq, stop_at_end=True
    )
    return [r.envelope for r in stub.Subscribe(request, timeout=10)]


def test_each_drop_reason(consent: consent_pb2_grpc.ConsentServiceStub) -> None:
    results = collect(
        consent,
        event("no-consent"),
        event("future", NOW + timedelta(minutes=10)),
        event("no-type", type=T.EVENT_TYPE_UNSPECIFIED),
        event("junk", identifiers=email("test@test.com")),
    )
    reasons = [r.drop_reason for r in results]
    assert reasons == [
        C.DROP_REASON_NO_CONSENT,
        C.DROP_REASON_INVALID,
        C.DROP_REASON_INVALID,
        C.DROP_REASON_IDENTIFIER_BLOCKED,
    ]
    assert "occurred_at" in results[1].detail and "type" in results[2].detail
    decide(
        consent,
        "analytics",
        T.DECISION_GRANTED,
        NOW - timedelta(days=3),
        expires=NOW - timedelta(days=1),
    )
    [expired] = collect(consent, event("expired", NOW - timedelta(days=2)))
    assert expired.drop_reason == C.DROP_REASON_CONSENT_EXPIRED
    decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    first, again = collect(consent, event("twice"), event("twice"))
    assert first.accepted and again.drop_reason == C.DROP_REASON_DUPLICATE
    [retry] = collect(consent, event("twice"))
    assert retry.drop_reason == C.DROP_REASON_DUPLICATE


def test_a_grant_given_after_the_event_does_not_admit_it(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(minutes=30))
    [result] = collect(consent, event("before-grant", NOW - timedelta(hours=1)))
    assert result.drop_reason == C.DROP_REASON_NO_CONSENT


def test_a_withdrawal_between_event_and_arrival_drops_it(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=2))
    decide(consent, "analytics", T.DECISION_WITHDRAWN, NOW - timedelta(minutes=5))
    [result] = collect(consent, event("late", NOW - timedelta(hours=1)))
    assert result.drop_reason == C.DROP_REASON_NO_CONSENT


def test_minimisation_keeps_only_what_the_purposes_allow(
    channel: grpc.Channel, consent: consent_pb2_grpc.ConsentServiceStub
) -> None:
    person = decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    [result] = collect(
        consent,
        event(
            "rich",
            type=T.EVENT_TYPE_PURCHASE,
            value=49.5,
            quantity=2,
            currency="GBP",
            attributes={"coupon": "X1"},
        ),
    )
    assert result.accepted and list(result.purposes) == ["analytics"] and result.person_id == person
    [recorded] = [
        e.behaviour_recorded for e in log(channel) if e.WhichOneof("body") == "behaviour_recorded"
    ]
    assert (
        recorded.item_id == "sku-1" and recorded.category == "garden" and recorded.channel == "web"
    )
    assert recorded.value == 0 and recorded.quantity == 0 and not recorded.attributes
    assert list(recorded.purposes) == ["analytics"]
    decide(consent, "profiling", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    collect(consent, event("richer", type=T.EVENT_TYPE_PURCHASE, value=49.5, quantity=2))
    latest = [
        e.behaviour_recorded for e in log(channel) if e.WhichOneof("body") == "behaviour_recorded"
    ][-1]
    assert latest.value == 49.5 and latest.quantity == 2
    assert list(latest.purposes) == ["analytics", "profiling"]


def test_events_can_name_the_person_directly_and_the_log_reads_from_any_seq(
    channel: grpc.Channel, consent: consent_pb2_grpc.ConsentServiceStub
) -> None:
    person = decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    results = collect(
        consent, *[event(f"e{n}", identifiers=[], person_id=person) for n in range(5)]
    )
    assert all(r.accepted for r in results)
    everything = log(channel)
    seqs = [e.seq for e in everything]
    assert seqs == list(range(1, len(seqs) + 1))
    tail = log(channel, from_seq=seqs[-3])
    assert [e.seq for e in tail] == seqs[-3:]
    assert [e.behaviour_recorded.event_id for e in tail] == ["e2", "e3", "e4"]


def test_malformed_requests_fail_with_the_event_index(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        consent.Collect(C.CollectRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = event("bad", identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_CUSTOM, value="x")])
    with pytest.raises(grpc.RpcError) as raised:
        consent.Collect(C.CollectRequest(events=[event("ok"), bad]), timeout=10)
    assert "events[1].identifiers[0].namespace" in read_error_details(raised.value).field_violations
    with pytest.raises(grpc.RpcError) as raised:
        consent.Collect(C.CollectRequest(events=[event(f"x{n}") for n in range(1001)]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_raw_identifier_is_stored_anywhere(
    consent: consent_pb2_grpc.ConsentServiceStub, urls: dict[str, str]
) -> None:
    phone = [T.Identifier(type=T.IDENTIFIER_TYPE_PHONE, value=PHONE)]
    decide(consent, "personalisation", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    decide(
        consent, "personalisation", T.DECISION_GRANTED, NOW - timedelta(hours=1), identifiers=phone
    )
    results = collect(
        consent,
        event("with-email", type=T.EVENT_TYPE_SEARCH, query="garden gnome"),
        event("with-phone", identifiers=phone),
        event("with-both", identifiers=[*email(), *phone]),
    )
    assert all(r.accepted for r in results)
    for url in urls.values():
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                for table in inspect(connection).get_table_names():
                    for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                        blob = " ".join(
                            v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row
                        ).lower()
                        for needle in ("grace.hopper", "example.net", "7911123456", "garden gnome"):
                            assert needle not in blob, f"{needle} in {table}"
        finally:
            engine.dispose()


def test_erasure_leaves_nothing_and_shreds_the_search_text(
    tmp_path: Path, consent: consent_pb2_grpc.ConsentServiceStub, urls: dict[str, str]
) -> None:
    person = decide(consent, "personalisation", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    [searched] = collect(consent, event("search-1", type=T.EVENT_TYPE_SEARCH, query="garden gnome"))
    assert searched.accepted
    exported = consent.ExportSubjectData(
        C.ExportSubjectDataRequest(subject=T.PersonRef(identifiers=email())), timeout=10
    )
    assert exported.bundle.events[0].query == "garden gnome"
    assert exported.bundle.consent_history[0].purpose == "personalisation"
    assert exported.bundle.identity.person_id == person and '"garden gnome"' in exported.json
    engine = make_engine(urls["STEWARD_DATABASE_URL"])
    with engine.connect() as connection:  # the backup an attacker might hold
        backup = connection.execute(
            text("SELECT event_id, query_ciphertext FROM consent_events WHERE person_id = :p"),
            {"p": person},
        ).all()
    assert backup and backup[0][1]
    erasure = consent.EraseSubject(
        C.EraseSubjectRequest(subject=T.PersonRef(identifiers=email()), reason="ticket 42"),
        timeout=10,
    ).erasure
    assert erasure.state == C.ERASURE_STATE_DONE and erasure.tombstone_ledger_seq > 0
    assert {s.service: s.state for s in erasure.services} == {
        "consent": C.ERASURE_STATE_DONE,
        "identity": C.ERASURE_STATE_DONE,
    }
    report = consent.GetErasure(
        C.GetErasureRequest(erasure_id=erasure.erasure_id), timeout=10
    ).erasure
    assert report.completed_at.seconds > 0 and report.person_id == ""
    with engine.connect() as connection:
        for table in ("consent_events", "consent_decisions"):
            count = connection.execute(
                text(f"SELECT count(*) FROM {table} WHERE person_id = :p"), {"p": person}
            ).scalar()
            assert count == 0, table
        for table in inspect(connection).get_table_names():
            if table in ("consent_outbox", "identity_outbox"):
                continue  # the event logs carry the SubjectErased / PersonForgotten envelopes
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                assert person not in " ".join(str(v) for v in row), table
    engine.dispose()
    keystore = KeyStore(
        make_engine(urls["STEWARD_KEYSTORE_DB_URL"]), Keyring.load(tmp_path / "data" / "keys")
    )
    assert keystore.data_key(person, create=False) is None, "the data key is destroyed"
    # Whatever key the store would hand out now cannot open the backed-up ciphertext.
    replacement = keystore.data_key(person, create=True)
    assert replacement is not None
    with pytest.raises(DecryptionError):
        decrypt_field(replacement, bytes(backup[0][1]), backup[0][0].encode())
    keystore.destroy([person])
    # Afterwards: events naming the erased person are dropped; the identifiers start afresh.
    [named] = collect(consent, event("after-1", identifiers=[], person_id=person))
    assert named.drop_reason == C.DROP_REASON_ERASED
    [fresh] = collect(consent, event("after-2"))
    assert fresh.drop_reason == C.DROP_REASON_NO_CONSENT
    check = consent.CheckConsent(
        C.CheckConsentRequest(subject=T.PersonRef(person_id=person), purpose="personalisation"),
        timeout=10,
    )
    assert check.reason == C.CONSENT_REASON_ERASED


def test_retention_sweep_removes_what_is_past_its_purposes_retention(
    tmp_path: Path, urls: dict[str, str], consent: consent_pb2_grpc.ConsentServiceStub
) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    env = {"STEWARD_DATA_DIR": str(tmp_path / "data"), **urls}
    decide(
        consent,
        "analytics",
        T.DECISION_GRANTED,
        NOW - timedelta(days=800),
        expires=NOW + timedelta(days=30),
    )
    old, recent = collect(
        consent, event("old", NOW - timedelta(days=400)), event("recent", NOW - timedelta(days=1))
    )
    assert old.accepted and recent.accepted
    result = CliRunner().invoke(app, ["maintenance", "sweep"], env=env)
    assert result.exit_code == 0, result.output
    assert "removed 1 event" in result.output
    again = CliRunner().invoke(app, ["maintenance", "sweep"], env=env)
    assert "nothing" in again.output.lower()


def test_counters_of_accepted_and_dropped_events_by_reason_and_channel(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / "data")})
    running = start_suite(
        dataclasses.replace(settings, port=0), ["consent", "identity"], metric_reader=reader
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = consent_pb2_grpc.ConsentServiceStub(channel)
            decide(stub, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=1))
            collect(
                stub, event("a1"), event("a2", channel="app"), event("d1", NOW + timedelta(hours=1))
            )
    finally:
        running.stop(0)
    data = reader.get_metrics_data()
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "steward.consent.events"
        for point in metric.data.data_points
    ]
    counted = {tuple(sorted(p.attributes.items())): p.value for p in points}
    assert counted[(("channel", "web"), ("outcome", "accepted"))] == 1
    assert counted[(("channel", "app"), ("outcome", "accepted"))] == 1
    assert counted[(("channel", "web"), ("outcome", "dropped"), ("reason", "invalid"))] == 1


def test_identity_merge_events_invalidate_the_person_cache(
    channel: grpc.Channel, consent: consent_pb2_grpc.ConsentServiceStub
) -> None:
    import time

    from steward.identity.v1 import identity_pb2, identity_pb2_grpc

    first = decide(consent, "analytics", T.DECISION_GRANTED, NOW - timedelta(hours=1))
    [cached] = collect(consent, event("c1"))
    assert cached.person_id == first
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    identity.Forget(identity_pb2.ForgetRequest(person_id=first, reason="test"), timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        [again] = collect(consent, event(f"c-{time.monotonic()}"))
        if again.drop_reason == C.DROP_REASON_NO_CONSENT:
            break  # a new person, without consent: the cache let go of the forgotten one
        time.sleep(0.05)
    assert again.drop_reason == C.DROP_REASON_NO_CONSENT
