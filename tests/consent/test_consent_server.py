"""The consent service over real gRPC channels, with identity in the same process."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.config import Settings
from services.common.db import make_engine
from services.common.errors import read_error_details
from services.common.keyring import Keyring
from services.consent import audit, ledger
from services.runtime import RunningSuite, start_suite

C = consent_pb2
A = audit_pb2
T = common_pb2
EMAIL = "Ada.Lovelace@Example.org"


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite]) -> RunningSuite:
    return start_services("consent", "identity")


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


@pytest.fixture
def consent(channel: grpc.Channel) -> consent_pb2_grpc.ConsentServiceStub:
    return consent_pb2_grpc.ConsentServiceStub(channel)


@pytest.fixture
def auditor(channel: grpc.Channel) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(channel)


def by_email(email: str = EMAIL) -> common_pb2.PersonRef:
    return T.PersonRef(identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=email)])


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def policy(consent: consent_pb2_grpc.ConsentServiceStub, purpose: str) -> str:
    purposes = consent.ListPurposes(C.ListPurposesRequest(), timeout=10).purposes
    return next(p.policy_version for p in purposes if p.id == purpose)


def record(
    consent: consent_pb2_grpc.ConsentServiceStub,
    subject: common_pb2.PersonRef,
    decisions: dict[str, int],
    **extra: object,
) -> consent_pb2.RecordConsentResponse:
    return consent.RecordConsent(
        C.RecordConsentRequest(
            subject=subject,
            decisions=[
                C.DecisionInput(purpose=p, decision=d, policy_version=policy(consent, p))  # type: ignore[arg-type]
                for p, d in decisions.items()
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            locale="en-GB",
            **extra,  # type: ignore[arg-type]
        ),
        timeout=10,
    )


def check(
    consent: consent_pb2_grpc.ConsentServiceStub, purpose: str, **extra: object
) -> consent_pb2.CheckConsentResponse:
    return consent.CheckConsent(
        C.CheckConsentRequest(subject=by_email(), purpose=purpose, **extra), timeout=10
    )  # type: ignore[arg-type]


def test_default_purposes_exist_on_first_start(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    purposes = consent.ListPurposes(C.ListPurposesRequest(), timeout=10).purposes
    assert [p.id for p in purposes] == ["analytics", "marketing", "personalisation", "profiling"]
    assert all(p.revision == 1 and len(p.notice_sha256) == 64 for p in purposes)


def test_record_then_check_and_get_with_provenance(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    unknown = check(consent, "marketing")
    assert not unknown.allowed and unknown.reason == C.CONSENT_REASON_UNKNOWN_PERSON
    answer = record(
        consent, by_email(), {"marketing": T.DECISION_GRANTED, "profiling": T.DECISION_DENIED}
    )
    assert answer.person_id.startswith("p_")
    assert [r.purpose for r in answer.receipts] == ["marketing", "profiling"]
    assert all(len(r.leaf_hash) == 32 for r in answer.receipts)
    allowed = check(consent, "marketing")
    assert allowed.allowed and allowed.reason == C.CONSENT_REASON_GRANTED
    assert allowed.ledger_seq == answer.receipts[0].seq and allowed.expires_at.seconds > 0
    states = {
        s.purpose: s
        for s in consent.GetConsent(C.GetConsentRequest(subject=by_email()), timeout=10).states
    }
    assert states["profiling"].reason == C.CONSENT_REASON_DENIED
    assert states["analytics"].reason == C.CONSENT_REASON_NOT_GRANTED
    assert states["marketing"].source == C.CONSENT_SOURCE_WEB_BANNER
    record(consent, by_email(), {"marketing": T.DECISION_WITHDRAWN})
    assert check(consent, "marketing").reason == C.CONSENT_REASON_WITHDRAWN


def test_expired_grant_counts_as_not_granted(consent: consent_pb2_grpc.ConsentServiceStub) -> None:
    now = datetime.now(UTC)
    consent.RecordConsent(
        C.RecordConsentRequest(
            subject=by_email(),
            decisions=[
                C.DecisionInput(
                    purpose="analytics",
                    decision=T.DECISION_GRANTED,
                    policy_version=policy(consent, "analytics"),
                    expires_at=stamp(now + timedelta(days=1)),
                )
            ],
            source=C.CONSENT_SOURCE_APP,
        ),
        timeout=10,
    )
    assert check(consent, "analytics").allowed
    later = check(consent, "analytics", at=stamp(now + timedelta(days=2)))
    assert not later.allowed and later.reason == C.CONSENT_REASON_EXPIRED


def test_unknown_purpose_and_outdated_policy_are_refused(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        consent.RecordConsent(
            C.RecordConsentRequest(
                subject=by_email(),
                decisions=[
                    C.DecisionInput(
                        purpose="telepathy", decision=T.DECISION_GRANTED, policy_version="1"
                    )
                ],
                source=C.CONSENT_SOURCE_WEB_BANNER,
            ),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decisions[0].purpose" in read_error_details(raised.value).field_violations
    with pytest.raises(grpc.RpcError) as raised:
        consent.RecordConsent(
            C.RecordConsentRequest(
                subject=by_email(),
                decisions=[
                    C.DecisionInput(
                        purpose="marketing", decision=T.DECISION_GRANTED, policy_version="1999-01"
                    )
                ],
                source=C.CONSENT_SOURCE_WEB_BANNER,
            ),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "2026-01" in str(read_error_details(raised.value).precondition_failures)


def test_malformed_subject_and_source_get_field_violations(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        consent.RecordConsent(
            C.RecordConsentRequest(
                subject=T.PersonRef(
                    person_id="p_1",
                    identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value="x@y.z")],
                ),
                decisions=[C.DecisionInput(purpose="marketing")],
            ),
            timeout=10,
        )
    fields = read_error_details(raised.value).field_violations
    assert {"subject", "source", "decisions[0].decision", "decisions[0].policy_version"} <= set(
        fields
    )


def test_consent_changes_are_published_on_the_event_log(
    channel: grpc.Channel, consent: consent_pb2_grpc.ConsentServiceStub
) -> None:
    person = record(consent, by_email(), {"personalisation": T.DECISION_GRANTED}).person_id
    record(consent, by_email(), {"personalisation": T.DECISION_GRANTED})  # a renewal: new expiry
    record(consent, by_email(), {"personalisation": T.DECISION_WITHDRAWN})
    log = events_pb2_grpc.EventLogServiceStub(channel)
    envelopes = [
        r.envelope
        for r in log.Subscribe(
            events_pb2.SubscribeRequest(producer="consent", consumer="test", stop_at_end=True),
            timeout=10,
        )
    ]
    changes = [e.consent_changed for e in envelopes if e.WhichOneof("body") == "consent_changed"]
    assert [c.allowed for c in changes] == [True, True, False]
    assert {c.person_id for c in changes} == {person}
    assert changes[-1].decision == T.DECISION_WITHDRAWN and changes[-1].ledger_seq > 0


def test_gpc_withdraws_and_a_later_grant_needs_acknowledgement(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    record(consent, by_email(), {"marketing": T.DECISION_GRANTED, "analytics": T.DECISION_GRANTED})
    answer = consent.ApplySignals(C.ApplySignalsRequest(subject=by_email(), gpc=True), timeout=10)
    states = {s.purpose: s for s in answer.states}
    assert states["marketing"].reason == C.CONSENT_REASON_WITHDRAWN
    assert states["analytics"].allowed, "analytics is not withdrawn by GPC"
    with pytest.raises(grpc.RpcError) as raised:
        record(consent, by_email(), {"marketing": T.DECISION_GRANTED})
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    acknowledged = record(
        consent, by_email(), {"marketing": T.DECISION_GRANTED}, acknowledge_gpc_conflict=True
    )
    assert check(consent, "marketing").allowed
    assert acknowledged.receipts[0].seq > 0


def test_bad_tcf_string_is_refused_on_its_field(
    consent: consent_pb2_grpc.ConsentServiceStub,
) -> None:
    for garbage in ["not a tc string!", "CP", "CPxxxx==.abc"]:
        with pytest.raises(grpc.RpcError) as raised:
            consent.ApplySignals(
                C.ApplySignalsRequest(subject=by_email(), tcf_string=garbage), timeout=10
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tcf_string" in read_error_details(raised.value).field_violations


def test_consent_mode_maps_to_purposes(consent: consent_pb2_grpc.ConsentServiceStub) -> None:
    answer = consent.ApplySignals(
        C.ApplySignalsRequest(
            subject=by_email(),
            consent_mode=C.ConsentModeSignals(
                analytics_storage=C.CONSENT_MODE_VALUE_GRANTED,
                ad_storage=C.CONSENT_MODE_VALUE_DENIED,
            ),
        ),
        timeout=10,
    )
    states = {s.purpose: s for s in answer.states}
    assert states["analytics"].allowed and states["analytics"].source == C.CONSENT_SOURCE_SIGNAL
    assert not states["marketing"].allowed


def test_purpose_change_is_versioned_and_on_the_ledger(
    consent: consent_pb2_grpc.ConsentServiceStub, auditor: audit_pb2_grpc.AuditServiceStub
) -> None:
    current = next(
        p
        for p in consent.ListPurposes(C.ListPurposesRequest(), timeout=10).purposes
        if p.id == "marketing"
    )
    changed = T.Purpose()
    changed.CopyFrom(current)
    changed.policy_version = "2026-07"
    answer = consent.DefinePurpose(C.DefinePurposeRequest(purpose=changed), timeout=10)
    assert answer.purpose.revision == 2 and answer.receipt.seq > 0
    with pytest.raises(grpc.RpcError) as raised:
        consent.RecordConsent(
            C.RecordConsentRequest(
                subject=by_email(),
                decisions=[
                    C.DecisionInput(
                        purpose="marketing", decision=T.DECISION_GRANTED, policy_version="2026-01"
                    )
                ],
                source=C.CONSENT_SOURCE_WEB_BANNER,
            ),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    checkpoint = auditor.GetCheckpoint(A.GetCheckpointRequest(sign_now=True), timeout=10).checkpoint
    proof = auditor.GetInclusionProof(
        A.GetInclusionProofRequest(seq=answer.receipt.seq, tree_size=checkpoint.tree_size),
        timeout=10,
    )
    assert (
        proof.entry.kind == A.ENTRY_KIND_PURPOSE_CHANGE and proof.entry.policy_version == "2026-07"
    )
    bad = T.Purpose(id="Not Valid")
    with pytest.raises(grpc.RpcError) as raised:
        consent.DefinePurpose(C.DefinePurposeRequest(purpose=bad), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "purpose.id" in read_error_details(raised.value).field_violations


def test_checkpoints_and_proofs_verify_with_the_public_key(
    suite: RunningSuite,
    consent: consent_pb2_grpc.ConsentServiceStub,
    auditor: audit_pb2_grpc.AuditServiceStub,
    tmp_path: Path,
) -> None:
    public_key = Keyring.load(tmp_path / "data" / "keys").public_key_pem()
    for n in range(5):
        record(consent, by_email(f"user{n}@example.org"), {"analytics": T.DECISION_GRANTED})
    first = auditor.GetCheckpoint(A.GetCheckpointRequest(sign_now=True), timeout=10).checkpoint
    record(consent, by_email(), {"marketing": T.DECISION_GRANTED})
    second = auditor.GetCheckpoint(A.GetCheckpointRequest(sign_now=True), timeout=10).checkpoint
    assert second.tree_size == first.tree_size + 1
    for checkpoint in (first, second):
        assert ledger.verify_checkpoint(public_key, ledger.checkpoint_from_message(checkpoint))
    proof = auditor.GetInclusionProof(
        A.GetInclusionProofRequest(seq=3, tree_size=second.tree_size), timeout=10
    )
    assert ledger.verify_inclusion(
        proof.leaf_hash, proof.leaf_index, proof.tree_size, list(proof.audit_path), second.root_hash
    )
    assert ledger.leaf_hash(proof.entry.canonical_bytes) == proof.leaf_hash
    consistency = auditor.GetConsistencyProof(
        A.GetConsistencyProofRequest(
            first_tree_size=first.tree_size, second_tree_size=second.tree_size
        ),
        timeout=10,
    )
    assert ledger.verify_consistency(
        first.tree_size,
        second.tree_size,
        first.root_hash,
        second.root_hash,
        list(consistency.proof),
    )
    with pytest.raises(grpc.RpcError) as raised:
        auditor.GetInclusionProof(
            A.GetInclusionProofRequest(seq=999, tree_size=second.tree_size), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_export_verifies_offline_and_no_raw_identifier_is_on_the_ledger(
    auditor: audit_pb2_grpc.AuditServiceStub,
    consent: consent_pb2_grpc.ConsentServiceStub,
    tmp_path: Path,
) -> None:
    record(consent, by_email(), {"analytics": T.DECISION_GRANTED, "marketing": T.DECISION_DENIED})
    auditor.GetCheckpoint(A.GetCheckpointRequest(sign_now=True), timeout=10)
    items = list(auditor.ExportLedger(A.ExportLedgerRequest(), timeout=10))
    header = items[0].header
    entries = [i.entry for i in items if i.WhichOneof("item") == "entry"]
    checkpoints = [i.checkpoint for i in items if i.WhichOneof("item") == "checkpoint"]
    path = tmp_path / "ledger.jsonl"
    audit.write_export(path, header, entries, checkpoints)
    public_key = Keyring.load(tmp_path / "data" / "keys").public_key_pem()
    report = audit.verify_export(path, public_key)
    assert report.ok, report.problem
    exported = path.read_text().lower()
    assert EMAIL.lower() not in exported and "ada.lovelace" not in exported


def test_the_ledger_table_refuses_update_and_delete(
    suite: RunningSuite, consent: consent_pb2_grpc.ConsentServiceStub, db_url: str
) -> None:
    record(consent, by_email(), {"analytics": T.DECISION_GRANTED})
    engine = make_engine(db_url)
    try:
        for statement in (
            "UPDATE consent_ledger SET actor = 'mallory'",
            "DELETE FROM consent_ledger",
        ):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM consent_ledger")).scalar() >= 5
    finally:
        engine.dispose()


def test_no_raw_identifier_in_any_consent_table(
    suite: RunningSuite, consent: consent_pb2_grpc.ConsentServiceStub, db_url: str
) -> None:
    record(consent, by_email(), {"analytics": T.DECISION_GRANTED})
    phone_ref = T.PersonRef(
        identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_PHONE, value="+44 7911 123456")]
    )
    record(consent, phone_ref, {"marketing": T.DECISION_GRANTED})
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            for table in inspect(connection).get_table_names():
                for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                    blob = " ".join(
                        v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row
                    ).lower()
                    for needle in ("ada.lovelace", "example.org", "7911123456", "7911 123456"):
                        assert needle not in blob, f"{needle} in {table}"
    finally:
        engine.dispose()


def test_gpc_acknowledgement_is_recorded_and_signals_cannot_override_gpc(
    consent: consent_pb2_grpc.ConsentServiceStub, auditor: audit_pb2_grpc.AuditServiceStub
) -> None:
    from tests.consent.test_tcf import Core

    consent.ApplySignals(C.ApplySignalsRequest(subject=by_email(), gpc=True), timeout=10)
    # A TC string granting marketing arrives later: it cannot undo the GPC withdrawal.
    answer = consent.ApplySignals(
        C.ApplySignalsRequest(subject=by_email(), tcf_string=Core().encode()), timeout=10
    )
    states = {s.purpose: s for s in answer.states}
    assert states["marketing"].reason == C.CONSENT_REASON_WITHDRAWN
    assert states["analytics"].allowed, "purposes GPC does not cover follow the TC string"
    granted = record(
        consent, by_email(), {"marketing": T.DECISION_GRANTED}, acknowledge_gpc_conflict=True
    )
    checkpoint = auditor.GetCheckpoint(A.GetCheckpointRequest(sign_now=True), timeout=10)
    proof = auditor.GetInclusionProof(
        A.GetInclusionProofRequest(
            seq=granted.receipts[0].seq, tree_size=checkpoint.checkpoint.tree_size
        ),
        timeout=10,
    )
    assert proof.entry.details["gpc_conflict_acknowledged"] == "true"
    assert proof.entry.subject.startswith("s_") and proof.entry.kind == A.ENTRY_KIND_DECISION


def test_checkpoints_are_signed_every_n_entries_and_every_t_seconds(
    tmp_path: Path, db_url: str
) -> None:
    settings = Settings.from_env(
        {
            "STEWARD_DATA_DIR": str(tmp_path / "data"),
            "STEWARD_DATABASE_URL": db_url,
            "STEWARD_CHECKPOINT_EVERY": "3",
            "STEWARD_CHECKPOINT_SECONDS": "0.2",
        }
    )
    running = start_suite(dataclasses.replace(settings, port=0), ["consent", "identity"])
    try:
        with grpc.insecure_channel(running.target) as channel:
            consent = consent_pb2_grpc.ConsentServiceStub(channel)
            auditor = audit_pb2_grpc.AuditServiceStub(channel)
            # The four default purposes were recorded at start: one checkpoint at 3 entries.
            first = auditor.GetCheckpoint(A.GetCheckpointRequest(), timeout=10).checkpoint
            assert first.tree_size >= 3
            record(consent, by_email(), {"analytics": T.DECISION_GRANTED})
            # Four default purposes and one decision: five entries in all.
            deadline = datetime.now(UTC) + timedelta(seconds=10)
            while datetime.now(UTC) < deadline:
                latest = auditor.GetCheckpoint(A.GetCheckpointRequest(), timeout=10).checkpoint
                if latest.tree_size == 5:
                    break
                time.sleep(0.05)
            # Four default purposes and one decision: the timer signed what was left over.
            assert latest.tree_size == 5
    finally:
        running.stop(0)
