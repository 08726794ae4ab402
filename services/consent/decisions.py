"""What a person's decisions mean for a purpose at a given moment.

The rules the tests pin down: a purpose with legal basis CONSENT is denied until granted; an
expired grant counts as not granted; LEGITIMATE_INTEREST is allowed until the person objects
(DENIED or WITHDRAWN); the newest decision by ``occurred_at`` wins, ties broken by ledger order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.consent.purposes import PurposeDefinition

Decision: TypeAlias = common_pb2.Decision.ValueType
ConsentReason: TypeAlias = consent_pb2.ConsentReason.ValueType
ConsentSource: TypeAlias = consent_pb2.ConsentSource.ValueType

C = consent_pb2


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A decision as recorded (its ledger seq orders ties)."""

    seq: int
    person_id: str
    purpose: str
    decision: Decision
    occurred_at: datetime
    expires_at: datetime | None
    source: ConsentSource
    policy_version: str
    signal: str = ""
    """``tcf``, ``gpc`` or ``consent_mode`` when a signal made the decision; empty otherwise."""


@dataclass(frozen=True, slots=True)
class ConsentState:
    """The effective consent for one purpose at one moment, with the decision behind it."""

    purpose: str
    allowed: bool
    reason: ConsentReason
    deciding: DecisionRecord | None = None

    @property
    def expires_at(self) -> datetime | None:
        if self.deciding is None or self.deciding.decision != common_pb2.DECISION_GRANTED:
            return None
        return self.deciding.expires_at

    @property
    def withdrawn_by_gpc(self) -> bool:
        return (
            self.deciding is not None
            and self.deciding.signal == "gpc"
            and self.deciding.decision != common_pb2.DECISION_GRANTED
        )


def deciding_decision(decisions: Iterable[DecisionRecord], at: datetime) -> DecisionRecord | None:
    """The newest decision made at or before ``at`` (ties: the later ledger entry)."""
    relevant = [d for d in decisions if d.occurred_at <= at]
    return max(relevant, key=lambda d: (d.occurred_at, d.seq), default=None)


def effective_state(
    purpose: PurposeDefinition, decisions: Iterable[DecisionRecord], at: datetime
) -> ConsentState:
    """Whether ``purpose`` is allowed at ``at`` given the person's decisions for it."""
    deciding = deciding_decision(decisions, at)
    if deciding is None:
        if purpose.needs_consent:
            return ConsentState(purpose.id, False, C.CONSENT_REASON_NOT_GRANTED)
        return ConsentState(purpose.id, True, C.CONSENT_REASON_LEGITIMATE_INTEREST)
    if deciding.decision == common_pb2.DECISION_GRANTED:
        if deciding.expires_at is not None and deciding.expires_at <= at:
            return ConsentState(purpose.id, False, C.CONSENT_REASON_EXPIRED, deciding)
        return ConsentState(purpose.id, True, C.CONSENT_REASON_GRANTED, deciding)
    if deciding.decision == common_pb2.DECISION_WITHDRAWN:
        return ConsentState(purpose.id, False, C.CONSENT_REASON_WITHDRAWN, deciding)
    return ConsentState(purpose.id, False, C.CONSENT_REASON_DENIED, deciding)
