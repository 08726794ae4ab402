"""The decision semantics, pinned down: what a person's decisions mean at a given moment."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.consent.decisions import DecisionRecord, effective_state
from services.consent.purposes import DEFAULT_PURPOSES, validate_purpose

C = consent_pb2
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CONSENT_PURPOSE = next(p for p in DEFAULT_PURPOSES if p.id == "marketing")
LI_PURPOSE = replace(
    CONSENT_PURPOSE, id="fraud_checks", legal_basis=common_pb2.LEGAL_BASIS_LEGITIMATE_INTEREST
)


def decision(seq: int, kind: int, at: datetime, expires: datetime | None = None) -> DecisionRecord:
    return DecisionRecord(
        seq, "p_1", CONSENT_PURPOSE.id, kind, at, expires, C.CONSENT_SOURCE_WEB_BANNER, "2026-01"
    )  # type: ignore[arg-type]


def test_consent_purpose_is_denied_until_granted() -> None:
    state = effective_state(CONSENT_PURPOSE, [], NOW)
    assert not state.allowed and state.reason == C.CONSENT_REASON_NOT_GRANTED


def test_grant_allows_until_it_expires() -> None:
    grant = decision(
        1, common_pb2.DECISION_GRANTED, NOW - timedelta(days=1), NOW + timedelta(days=1)
    )
    assert effective_state(CONSENT_PURPOSE, [grant], NOW).allowed
    later = effective_state(CONSENT_PURPOSE, [grant], NOW + timedelta(days=2))
    assert not later.allowed and later.reason == C.CONSENT_REASON_EXPIRED


def test_grant_made_after_the_moment_asked_about_does_not_count() -> None:
    grant = decision(1, common_pb2.DECISION_GRANTED, NOW + timedelta(hours=1))
    assert not effective_state(CONSENT_PURPOSE, [grant], NOW).allowed


def test_legitimate_interest_is_allowed_until_the_person_objects() -> None:
    assert effective_state(LI_PURPOSE, [], NOW).reason == C.CONSENT_REASON_LEGITIMATE_INTEREST
    objection = replace(
        decision(1, common_pb2.DECISION_DENIED, NOW - timedelta(hours=1)), purpose=LI_PURPOSE.id
    )
    state = effective_state(LI_PURPOSE, [objection], NOW)
    assert not state.allowed and state.reason == C.CONSENT_REASON_DENIED


def test_newest_decision_by_occurred_at_wins_even_if_recorded_earlier() -> None:
    withdrawal = decision(1, common_pb2.DECISION_WITHDRAWN, NOW - timedelta(minutes=5))
    late_import_of_old_grant = decision(2, common_pb2.DECISION_GRANTED, NOW - timedelta(days=3))
    state = effective_state(CONSENT_PURPOSE, [withdrawal, late_import_of_old_grant], NOW)
    assert state.reason == C.CONSENT_REASON_WITHDRAWN and state.deciding == withdrawal


def test_ties_on_occurred_at_are_broken_by_ledger_order() -> None:
    at = NOW - timedelta(minutes=1)
    first = decision(7, common_pb2.DECISION_GRANTED, at)
    second = decision(8, common_pb2.DECISION_DENIED, at)
    assert effective_state(CONSENT_PURPOSE, [second, first], NOW).deciding == second


def test_default_purposes_are_valid() -> None:
    for purpose in DEFAULT_PURPOSES:
        assert not validate_purpose(purpose), purpose.id


def test_invalid_purpose_names_each_field() -> None:
    bad = replace(
        CONSENT_PURPOSE,
        id="Bad Id",
        notice_sha256="xyz",
        retention_days=0,
        allowed_fields=("item_id", "password", "item_id"),
        default_lifetime=timedelta(0),
    )
    fields = {field for field, _ in validate_purpose(bad)}
    assert fields == {
        "purpose.id",
        "purpose.notice_sha256",
        "purpose.retention_days",
        "purpose.allowed_fields[1]",
        "purpose.allowed_fields",
        "purpose.default_lifetime",
    }
