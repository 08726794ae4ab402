"""Decisions derived from browser and framework signals: IAB TCF v2.2, GPC, Google Consent Mode v2.

Each signal speaks about some purposes; :func:`decisions_from_signals` turns what they say into at
most one decision per defined purpose.

TCF (a :class:`~services.consent.tcf.TCString`, mapped by :class:`TcfMapping`). A Steward purpose
is GRANTED when every TCF purpose mapped to it is met, DENIED otherwise. A TCF purpose is met

- by consent: its PurposesConsent bit is set and, when ``vendor_id`` is set, our vendor's
  VendorConsent bit too, and no publisher restriction for our vendor requires legitimate
  interest for it;
- or, only for a Steward purpose whose legal basis is LEGITIMATE_INTEREST, by legitimate
  interest: its PurposesLITransparency bit is set and TCF 2.2 allows legitimate interest for it
  (never purposes 1, 3, 4, 5, 6) and, when ``vendor_id`` is set, our vendor's VendorLegitimate-
  Interest bit too, and no publisher restriction for our vendor requires consent for it.

A publisher restriction that flatly disallows a purpose for our vendor leaves it unmet. With
``vendor_id`` 0 (Steward is not a registered TCF vendor; the shop runs it as first party) the
vendor and restriction parts are skipped and the purpose bits come from the publisher TC segment
when the string has one (the publisher's own purposes), from the core segment otherwise.
PurposeOneTreatment is not special-cased: a string that never asked for purpose 1 does not meet
it (the protective reading).

GPC: ``True`` WITHDRAWS every purpose flagged ``gpc_withdraws``; ``False`` or absent says nothing
(the absence of an objection is not a grant).

Consent Mode (mapped by :class:`ConsentModeMapping`): a purpose is GRANTED when all its fields are
``granted``, DENIED when any is ``denied``, and left alone when some are not sent. By default
``analytics_storage`` decides ``analytics`` and ``ad_storage`` + ``ad_user_data`` +
``ad_personalization`` together decide ``marketing``. Consent Mode says nothing about content
personalisation or profiling (``ad_personalization`` is about advertising), so those purposes are
not mapped.

Conflicts: when signals disagree about a purpose the most protective one wins: WITHDRAWN over
DENIED over GRANTED; among equals GPC, then TCF, then Consent Mode decides. The winner's detail
names the signals it overrode (``overridden``) and those that agreed (``concurring``).

A GRANTED decision for a purpose whose current state is a GPC withdrawal needs the caller's
explicit acknowledgement (:func:`requires_gpc_acknowledgement`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.common.errors import InvalidArgument, PreconditionViolation
from services.consent.tcf import MAX_PURPOSE_ID, RestrictionType, TCString

Decision: TypeAlias = common_pb2.Decision.ValueType
LegalBasis: TypeAlias = common_pb2.LegalBasis.ValueType
Signal: TypeAlias = Literal["tcf", "gpc", "consent_mode"]
ConsentModeInput: TypeAlias = Mapping[str, str] | consent_pb2.ConsentModeSignals

GRANTED: Final = common_pb2.DECISION_GRANTED
DENIED: Final = common_pb2.DECISION_DENIED
WITHDRAWN: Final = common_pb2.DECISION_WITHDRAWN

DEFAULT_TCF_PURPOSES: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {
        # 1 store/access on a device, 8 measure content performance, 9 understand audiences.
        "analytics": (1, 8, 9),
        # 5 create profiles to personalise content, 6 use them to select personalised content.
        "personalisation": (1, 5, 6),
        # 3 create profiles for personalised advertising, 5 … to personalise content.
        "profiling": (1, 3, 5),
        # 2 limited data to select ads, 3/4 create/use ad profiles, 7 measure ad performance.
        "marketing": (1, 2, 3, 4, 7),
    }
)
"""Steward purpose -> the TCF v2.2 purposes that must all be met for it."""

CONSENT_MODE_FIELDS: Final = (
    "ad_storage",
    "analytics_storage",
    "ad_user_data",
    "ad_personalization",
)
DEFAULT_CONSENT_MODE_PURPOSES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "analytics": ("analytics_storage",),
        "marketing": ("ad_storage", "ad_user_data", "ad_personalization"),
    }
)
"""Steward purpose -> the Consent Mode v2 fields that must all be ``granted`` for it."""

_PURPOSE_ID: Final = re.compile(r"[a-z][a-z0-9_]{1,63}")
_MAX_VENDOR_ID: Final = 65_535
_CONSENT_MODE_VALUES: Final[Mapping[str, bool | None]] = MappingProxyType(
    {
        "granted": True,
        "denied": False,
        "CONSENT_MODE_VALUE_GRANTED": True,
        "CONSENT_MODE_VALUE_DENIED": False,
        "CONSENT_MODE_VALUE_UNSPECIFIED": None,
        "": None,
    }
)
_PROTECTION: Final[Mapping[Decision, int]] = MappingProxyType({GRANTED: 1, DENIED: 2, WITHDRAWN: 3})
_DECISION_NAMES: Final[Mapping[Decision, str]] = MappingProxyType(
    {GRANTED: "granted", DENIED: "denied", WITHDRAWN: "withdrawn"}
)


def _check_purpose_id(purpose: str) -> None:
    if not _PURPOSE_ID.fullmatch(purpose):
        raise ValueError(f"{purpose!r} is not a purpose id (lower snake case)")


@dataclass(frozen=True, slots=True)
class TcfMapping:
    """How a TC string speaks for Steward purposes.

    ``vendor_id`` is our id on IAB's Global Vendor List, or 0 when Steward is not registered (then
    only purpose signals count, from the publisher TC segment when present).
    """

    vendor_id: int = 0
    purposes: Mapping[str, Sequence[int]] = field(default_factory=lambda: DEFAULT_TCF_PURPOSES)

    def __post_init__(self) -> None:
        if not 0 <= self.vendor_id <= _MAX_VENDOR_ID:
            raise ValueError(f"vendor_id must be 0 to {_MAX_VENDOR_ID}, not {self.vendor_id}")
        table: dict[str, tuple[int, ...]] = {}
        for purpose, numbers in self.purposes.items():
            _check_purpose_id(purpose)
            if not numbers or any(not 1 <= n <= MAX_PURPOSE_ID for n in numbers):
                raise ValueError(
                    f"purpose {purpose!r} must map to TCF purposes 1 to {MAX_PURPOSE_ID}, "
                    f"not {list(numbers)}"
                )
            table[purpose] = tuple(sorted(set(numbers)))
        object.__setattr__(self, "purposes", MappingProxyType(table))


@dataclass(frozen=True, slots=True)
class ConsentModeMapping:
    """Which Consent Mode v2 fields decide which Steward purposes."""

    purposes: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: DEFAULT_CONSENT_MODE_PURPOSES
    )

    def __post_init__(self) -> None:
        table: dict[str, tuple[str, ...]] = {}
        for purpose, fields in self.purposes.items():
            _check_purpose_id(purpose)
            if not fields or any(f not in CONSENT_MODE_FIELDS for f in fields):
                raise ValueError(
                    f"purpose {purpose!r} must map to Consent Mode fields among "
                    f"{', '.join(CONSENT_MODE_FIELDS)}, not {list(fields)}"
                )
            table[purpose] = tuple(dict.fromkeys(fields))
        object.__setattr__(self, "purposes", MappingProxyType(table))


DEFAULT_TCF_MAPPING: Final = TcfMapping()
DEFAULT_CONSENT_MODE_MAPPING: Final = ConsentModeMapping()


@dataclass(frozen=True, slots=True)
class PurposeInfo:
    """What the signals need to know of a defined purpose."""

    legal_basis: LegalBasis
    gpc_withdraws: bool


@dataclass(frozen=True, slots=True)
class SignalDecision:
    """A decision a signal made for one purpose, with what it was based on (for the ledger)."""

    purpose: str
    decision: Decision
    signal: Signal
    detail: dict[str, str] = field(default_factory=dict)


def decisions_from_signals(
    tcf: TCString | None,
    gpc: bool | None,
    consent_mode: ConsentModeInput | None,
    purposes: Mapping[str, PurposeInfo],
    mapping: TcfMapping = DEFAULT_TCF_MAPPING,
    consent_mode_mapping: ConsentModeMapping = DEFAULT_CONSENT_MODE_MAPPING,
) -> list[SignalDecision]:
    """One decision per defined purpose that some signal speaks about, sorted by purpose.

    Purposes that a mapping names but ``purposes`` does not define are ignored. Raises
    :class:`InvalidArgument` (on ``consent_mode.<field>``) for an unknown Consent Mode field or
    value.
    """
    mode = _consent_mode_values(consent_mode)
    candidates: dict[str, list[SignalDecision]] = {}

    def propose(decision: SignalDecision) -> None:
        candidates.setdefault(decision.purpose, []).append(decision)

    if gpc:
        for purpose, info in purposes.items():
            if info.gpc_withdraws:
                propose(SignalDecision(purpose, WITHDRAWN, "gpc", {"gpc": "true"}))
    if tcf is not None:
        for purpose, tcf_purposes in mapping.purposes.items():
            if purpose in purposes:
                propose(_tcf_decision(purpose, purposes[purpose], tcf, tcf_purposes, mapping))
    for purpose, fields in consent_mode_mapping.purposes.items():
        if purpose in purposes:
            decision = _consent_mode_decision(purpose, fields, mode)
            if decision is not None:
                propose(decision)
    return [_most_protective(candidates[purpose]) for purpose in sorted(candidates)]


def requires_gpc_acknowledgement(purpose_gpc_withdrawn: bool, decision: Decision) -> bool:
    """Whether recording ``decision`` needs ``acknowledge_gpc_conflict``: only a grant for a
    purpose whose current state is a withdrawal by a GPC signal does."""
    return purpose_gpc_withdrawn and decision == GRANTED


def gpc_conflict_violation(purpose: str) -> PreconditionViolation:
    """The FAILED_PRECONDITION violation for a grant refused for want of acknowledgement."""
    return (
        "GPC",
        f"purposes/{purpose}",
        "withdrawn by a Global Privacy Control signal; a grant needs acknowledge_gpc_conflict",
    )


# TCF ------------------------------------------------------------------------------------------


def _tcf_decision(
    purpose: str,
    info: PurposeInfo,
    tcf: TCString,
    tcf_purposes: Sequence[int],
    mapping: TcfMapping,
) -> SignalDecision:
    allow_li = info.legal_basis == common_pb2.LEGAL_BASIS_LEGITIMATE_INTEREST
    unmet = [p for p in tcf_purposes if not _tcf_purpose_met(tcf, p, allow_li, mapping.vendor_id)]
    if mapping.vendor_id:
        source = "vendor"
    elif tcf.publisher_tc is not None:
        source = "publisher_tc"
    else:
        source = "core"
    detail = {
        "tcf_purposes": _numbers(tcf_purposes),
        "basis": "consent_or_legitimate_interest" if allow_li else "consent",
        "source": source,
        "vendor_id": str(mapping.vendor_id),
        "cmp_id": str(tcf.cmp_id),
        "policy_version": str(tcf.policy_version),
        "vendor_list_version": str(tcf.vendor_list_version),
    }
    if unmet:
        detail["unmet"] = _numbers(unmet)
    return SignalDecision(purpose, DENIED if unmet else GRANTED, "tcf", detail)


def _tcf_purpose_met(tcf: TCString, purpose: int, allow_li: bool, vendor_id: int) -> bool:
    if not vendor_id:
        if tcf.publisher_tc is not None:
            return purpose in tcf.publisher_tc.purpose_consents or (
                allow_li and tcf.publisher_tc.has_purpose_legitimate_interest(purpose)
            )
        return tcf.has_purpose_consent(purpose) or (
            allow_li and tcf.has_purpose_legitimate_interest(purpose)
        )
    restrictions = tcf.restrictions_for(vendor_id, purpose)
    if RestrictionType.NOT_ALLOWED in restrictions:
        return False
    by_consent = (
        RestrictionType.REQUIRE_LEGITIMATE_INTEREST not in restrictions
        and tcf.has_purpose_consent(purpose)
        and vendor_id in tcf.vendor_consents
    )
    by_legitimate_interest = (
        allow_li
        and RestrictionType.REQUIRE_CONSENT not in restrictions
        and tcf.has_purpose_legitimate_interest(purpose)
        and vendor_id in tcf.vendor_legitimate_interests
    )
    return by_consent or by_legitimate_interest


# Consent Mode ---------------------------------------------------------------------------------


def _consent_mode_values(consent_mode: ConsentModeInput | None) -> dict[str, bool]:
    """Field -> granted, for the fields that were sent."""
    if consent_mode is None:
        return {}
    values: dict[str, bool] = {}
    if isinstance(consent_mode, consent_pb2.ConsentModeSignals):
        for name in CONSENT_MODE_FIELDS:
            value = getattr(consent_mode, name)
            if value == consent_pb2.CONSENT_MODE_VALUE_GRANTED:
                values[name] = True
            elif value == consent_pb2.CONSENT_MODE_VALUE_DENIED:
                values[name] = False
            elif value != consent_pb2.CONSENT_MODE_VALUE_UNSPECIFIED:
                raise InvalidArgument({f"consent_mode.{name}": f"unknown value {value}"})
        return values
    for name, text in consent_mode.items():
        if name not in CONSENT_MODE_FIELDS:
            known = ", ".join(CONSENT_MODE_FIELDS)
            raise InvalidArgument(
                {f"consent_mode.{name}": f"not a Consent Mode v2 field ({known})"}
            )
        if text not in _CONSENT_MODE_VALUES:
            raise InvalidArgument({f"consent_mode.{name}": "must be 'granted' or 'denied'"})
        granted = _CONSENT_MODE_VALUES[text]
        if granted is not None:
            values[name] = granted
    return values


def _consent_mode_decision(
    purpose: str, fields: Sequence[str], values: Mapping[str, bool]
) -> SignalDecision | None:
    sent = {name: values[name] for name in fields if name in values}
    if False in sent.values():
        decision = DENIED
    elif len(sent) == len(fields):
        decision = GRANTED
    else:
        return None
    detail = {
        name: ("granted" if values[name] else "denied") if name in values else "not_sent"
        for name in fields
    }
    return SignalDecision(purpose, decision, "consent_mode", detail)


# Conflicts ------------------------------------------------------------------------------------


def _most_protective(candidates: Sequence[SignalDecision]) -> SignalDecision:
    winner = max(candidates, key=lambda d: _PROTECTION[d.decision])  # first among equals
    others = [d for d in candidates if d is not winner]
    detail = dict(winner.detail)
    overridden = [_describe(d) for d in others if d.decision != winner.decision]
    concurring = [d.signal for d in others if d.decision == winner.decision]
    if overridden:
        detail["overridden"] = ",".join(overridden)
    if concurring:
        detail["concurring"] = ",".join(concurring)
    return SignalDecision(winner.purpose, winner.decision, winner.signal, detail)


def _describe(decision: SignalDecision) -> str:
    return f"{decision.signal}={_DECISION_NAMES[decision.decision]}"


def _numbers(numbers: Sequence[int]) -> str:
    return ",".join(str(n) for n in numbers)
