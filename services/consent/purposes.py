"""Purposes of processing: what each may keep, for how long, and on which lawful basis.

A purpose is versioned: every DefinePurpose makes a new revision, recorded on the ledger, and
decisions must name the purpose's current policy version so nobody consents to a notice they
were never shown.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

from steward.common.v1 import common_pb2

from services.common.errors import FieldViolations

LegalBasis: TypeAlias = common_pb2.LegalBasis.ValueType

EVENT_FIELDS: Final = (
    "item_id",
    "category",
    "value",
    "dwell_ms",
    "query",
    "channel",
    "quantity",
    "currency",
)
"""BehaviourEvent fields a purpose may keep; attributes are named ``attributes.<key>``."""

_PURPOSE_ID: Final = re.compile(r"[a-z][a-z0-9_]{1,63}")
_ATTRIBUTE_FIELD: Final = re.compile(r"attributes\.[A-Za-z0-9_.-]{1,64}")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
MAX_LIFETIME: Final = timedelta(days=5 * 366)
MAX_RETENTION_DAYS: Final = 3650
MONTH: Final = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class PurposeDefinition:
    """One revision of a purpose."""

    id: str
    legal_basis: LegalBasis
    description: str
    policy_version: str
    notice_sha256: str
    default_lifetime: timedelta
    retention_days: int
    allowed_fields: tuple[str, ...]
    gpc_withdraws: bool
    revision: int = 0
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def needs_consent(self) -> bool:
        return self.legal_basis == common_pb2.LEGAL_BASIS_CONSENT

    def keeps(self, event_field: str) -> bool:
        return event_field in self.allowed_fields


def notice_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _default(
    purpose_id: str,
    description: str,
    fields: tuple[str, ...],
    *,
    gpc: bool,
    retention_days: int,
    basis: LegalBasis = common_pb2.LEGAL_BASIS_CONSENT,
) -> PurposeDefinition:
    return PurposeDefinition(
        id=purpose_id,
        legal_basis=basis,
        description=description,
        policy_version="2026-01",
        notice_sha256=notice_hash(description),
        default_lifetime=13 * MONTH,
        retention_days=retention_days,
        allowed_fields=fields,
        gpc_withdraws=gpc,
    )


DEFAULT_PURPOSES: Final = (
    _default(
        "analytics",
        "Measure how the shop is used (pages and products viewed, searches, channels) "
        "to improve it. No profile of you is built.",
        ("item_id", "category", "channel"),
        gpc=False,
        retention_days=395,
    ),
    _default(
        "personalisation",
        "Recommend products from what you view, search for, put in your cart and buy.",
        ("item_id", "category", "value", "dwell_ms", "quantity", "channel", "query"),
        gpc=True,
        retention_days=395,
    ),
    _default(
        "profiling",
        "Describe your shopping habits with a few tags (for example 'loyal outdoor buyer') "
        "that shape offers; you can see and object to each tag.",
        ("item_id", "category", "value", "dwell_ms", "quantity", "channel", "currency"),
        gpc=True,
        retention_days=180,
    ),
    _default(
        "marketing",
        "Send you offers and newsletters by e-mail and in the app.",
        ("category", "channel"),
        gpc=True,
        retention_days=730,
    ),
)
"""Created on first start when no purpose exists (documented in the README)."""


def validate_purpose(purpose: PurposeDefinition, path: str = "purpose") -> FieldViolations:
    """Field violations of a proposed purpose (empty when acceptable)."""
    violations = FieldViolations()
    violations.check(
        bool(_PURPOSE_ID.fullmatch(purpose.id)),
        f"{path}.id",
        "lower snake case, 2 to 64 characters, starting with a letter",
    )
    violations.check(
        purpose.legal_basis
        in (common_pb2.LEGAL_BASIS_CONSENT, common_pb2.LEGAL_BASIS_LEGITIMATE_INTEREST),
        f"{path}.legal_basis",
        "must be LEGAL_BASIS_CONSENT or LEGAL_BASIS_LEGITIMATE_INTEREST",
    )
    violations.check(
        0 < len(purpose.description) <= 2000, f"{path}.description", "1 to 2000 characters"
    )
    violations.check(
        0 < len(purpose.policy_version) <= 64, f"{path}.policy_version", "1 to 64 characters"
    )
    violations.check(
        bool(_SHA256_HEX.fullmatch(purpose.notice_sha256)),
        f"{path}.notice_sha256",
        "lower-case hex SHA-256 of the notice text",
    )
    violations.check(
        timedelta(0) < purpose.default_lifetime <= MAX_LIFETIME,
        f"{path}.default_lifetime",
        "more than zero and at most 5 years",
    )
    violations.check(
        0 < purpose.retention_days <= MAX_RETENTION_DAYS,
        f"{path}.retention_days",
        f"1 to {MAX_RETENTION_DAYS} days",
    )
    for index, name in enumerate(purpose.allowed_fields):
        violations.check(
            name in EVENT_FIELDS or bool(_ATTRIBUTE_FIELD.fullmatch(name)),
            f"{path}.allowed_fields[{index}]",
            f"one of {', '.join(EVENT_FIELDS)} or attributes.<key>",
        )
    violations.check(
        len(set(purpose.allowed_fields)) == len(purpose.allowed_fields),
        f"{path}.allowed_fields",
        "each field may appear only once",
    )
    return violations
