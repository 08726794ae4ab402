"""Consent follows withdrawals and erasures until every deployed consumer has acknowledged them.

Tagging and recommend are deployed elsewhere here (their addresses are configured but nothing
listens), so the test plays both consumers through EventLogService.Ack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.db import for_writes, make_engine
from services.common.outbox import Outbox
from services.consent import server as consent_server
from services.consent.store import OUTBOX_TABLES, PRODUCER
from services.runtime import RunningSuite
from services.testing import StewardSuite

T = common_pb2
C = consent_pb2
A = audit_pb2
ELSEWHERE = {
    "STEWARD_TAGGING_TARGET": "127.0.0.1:9",
    "STEWARD_RECOMMEND_TARGET": "127.0.0.1:9",
}


@pytest.fixture
def suite(
    start_services: Callable[..., RunningSuite], monkeypatch: pytest.MonkeyPatch
) -> RunningSuite:
    monkeypatch.setattr(consent_server, "RECONCILE_INTERVAL_SECONDS", 0.1)
    return start_services("consent", "identity", environ=ELSEWHERE)


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


SUBJECT = T.PersonRef(
    identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value="cy@example.org")]
)


def decide(channel: grpc.Channel, purpose: str, decision: int) -> consent_pb2.LedgerReceipt:
    [receipt] = (
        consent_pb2_grpc.ConsentServiceStub(channel)
        .RecordConsent(
            C.RecordConsentRequest(
                subject=SUBJECT,
                decisions=[
                    C.DecisionInput(purpose=purpose, decision=decision, policy_version="2026-01")  # type: ignore[arg-type]
                ],
                source=C.CONSENT_SOURCE_APP,
                occurred_at=stamp(datetime.now(UTC) - timedelta(seconds=1)),
            ),
            timeout=10,
        )
        .receipts
    )
    return receipt


def propagation(channel: grpc.Channel, purpose: str) -> consent_pb2.WithdrawalPropagation:
    states = (
        consent_pb2_grpc.ConsentServiceStub(channel)
        .GetConsent(C.GetConsentRequest(subject=SUBJECT), timeout=10)
        .states
    )
    [state] = [s for s in states if s.purpose == purpose]
    return state.propagation


def last_seq(channel: grpc.Channel) -> int:
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="consent", consumer="test", stop_at_end=True),
        timeout=10,
    )
    return max(reply.envelope.seq for reply in log)


def ack(channel: grpc.Channel, consumer: str, seq: int) -> None:
    events_pb2_grpc.EventLogServiceStub(channel).Ack(
        events_pb2.AckRequest(producer="consent", consumer=consumer, seq=seq), timeout=10
    )


def ledger(channel: grpc.Channel) -> dict[int, audit_pb2.LedgerEntry]:
    items = audit_pb2_grpc.AuditServiceStub(channel).ExportLedger(
        A.ExportLedgerRequest(), timeout=10
    )
    return {item.entry.seq: item.entry for item in items if item.HasField("entry")}


def test_a_withdrawal_is_propagated_when_the_last_consumer_acknowledges_it(
    channel: grpc.Channel,
) -> None:
    decide(channel, "marketing", T.DECISION_GRANTED)
    assert not propagation(channel, "marketing").acknowledgements  # a grant: nothing to follow
    withdrawal = decide(channel, "marketing", T.DECISION_WITHDRAWN)
    seq = last_seq(channel)

    pending = propagation(channel, "marketing")
    assert not pending.complete and not pending.acknowledgements
    ack(channel, "tagging", seq)
    halfway = propagation(channel, "marketing")
    assert not halfway.complete
    assert [a.consumer for a in halfway.acknowledgements] == ["tagging"]
    assert not any(e.kind == A.ENTRY_KIND_WITHDRAWAL_PROPAGATED for e in ledger(channel).values())

    ack(channel, "recommend", seq)
    done = propagation(channel, "marketing")
    assert done.complete
    assert sorted(a.consumer for a in done.acknowledgements) == ["recommend", "tagging"]
    entry = ledger(channel)[done.propagated_ledger_seq]
    assert entry.kind == A.ENTRY_KIND_WITHDRAWAL_PROPAGATED and entry.actor == "system"
    assert entry.details["withdrawal_seq"] == str(withdrawal.seq)
    assert set(entry.details) == {"withdrawal_seq", "took_ms.recommend", "took_ms.tagging"}
    # Acknowledging again changes nothing: one entry per withdrawal.
    ack(channel, "recommend", seq)
    kinds = [e.kind for e in ledger(channel).values()]
    assert kinds.count(A.ENTRY_KIND_WITHDRAWAL_PROPAGATED) == 1


def test_an_acknowledgement_stored_without_its_callback_is_reconciled_on_a_timer(
    suite: RunningSuite, channel: grpc.Channel
) -> None:
    decide(channel, "profiling", T.DECISION_GRANTED)
    decide(channel, "profiling", T.DECISION_WITHDRAWN)
    seq = last_seq(channel)
    # As if a replica took the acks, or the callback failed: the rows exist, nothing else ran.
    engine = make_engine(suite_settings_url(suite))
    try:
        outbox = Outbox(PRODUCER, OUTBOX_TABLES)
        with for_writes(engine).begin() as connection:
            outbox.record_ack(connection, "tagging", seq)
            outbox.record_ack(connection, "recommend", seq)
    finally:
        engine.dispose()
    StewardSuite.eventually(lambda: propagation(channel, "profiling").complete)


def suite_settings_url(suite: RunningSuite) -> str:
    return suite.parts[0].logs[PRODUCER].engine.url.render_as_string(hide_password=False)


def test_an_erasure_waits_for_both_consumers_then_redacts_the_log(
    suite: RunningSuite, channel: grpc.Channel
) -> None:
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    decide(channel, "analytics", T.DECISION_GRANTED)
    erasure = consent.EraseSubject(C.EraseSubjectRequest(subject=SUBJECT), timeout=10).erasure
    person = erasure.person_id
    states = {s.service: s.state for s in erasure.services}
    assert states == {
        "consent": C.ERASURE_STATE_DONE,
        "identity": C.ERASURE_STATE_DONE,
        "tagging": C.ERASURE_STATE_PENDING,
        "recommend": C.ERASURE_STATE_PENDING,
    }
    assert erasure.state == C.ERASURE_STATE_IN_PROGRESS
    seq = last_seq(channel)
    ack(channel, "tagging", seq)
    ack(channel, "recommend", seq)
    report = consent.GetErasure(
        C.GetErasureRequest(erasure_id=erasure.erasure_id), timeout=10
    ).erasure
    assert report.state == C.ERASURE_STATE_DONE and report.person_id == ""
    assert {s.service: s.state for s in report.services} == dict.fromkeys(
        states, C.ERASURE_STATE_DONE
    )
    assert "applied SubjectErased" in {s.service: s.detail for s in report.services}["tagging"]
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="consent", consumer="test", stop_at_end=True),
        timeout=10,
    )
    envelopes = [reply.envelope for reply in log]
    assert [e.seq for e in envelopes] == list(range(1, seq + 1))  # nothing removed
    assert all(person.encode() not in e.SerializeToString() for e in envelopes)
    assert envelopes[-1].WhichOneof("body") == "redacted"  # the SubjectErased itself
    engine = make_engine(suite_settings_url(suite))
    try:
        with engine.connect() as connection:
            kinds = list(connection.execute(select(OUTBOX_TABLES.outbox.c.kind)).scalars())
    finally:
        engine.dispose()
    assert "subject_erased" not in kinds and "redacted" in kinds


def test_an_export_fails_when_a_deployed_service_cannot_answer(channel: grpc.Channel) -> None:
    decide(channel, "analytics", T.DECISION_GRANTED)
    with pytest.raises(grpc.RpcError) as failure:
        consent_pb2_grpc.ConsentServiceStub(channel).ExportSubjectData(
            C.ExportSubjectDataRequest(subject=SUBJECT), timeout=10
        )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tagging" in (failure.value.details() or "")
