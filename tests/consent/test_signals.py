"""Decisions from TCF, GPC and Consent Mode signals, and the rule on overriding GPC."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.common.errors import InvalidArgument
from services.consent.signals import (
    DEFAULT_CONSENT_MODE_PURPOSES,
    DEFAULT_TCF_PURPOSES,
    ConsentModeMapping,
    PurposeInfo,
    SignalDecision,
    TcfMapping,
    decisions_from_signals,
    gpc_conflict_violation,
    requires_gpc_acknowledgement,
)
from services.consent.tcf import (
    PublisherRestriction,
    PublisherTC,
    RestrictionType,
    TCString,
    parse_tc_string,
)

GRANTED = common_pb2.DECISION_GRANTED
DENIED = common_pb2.DECISION_DENIED
WITHDRAWN = common_pb2.DECISION_WITHDRAWN
CONSENT = common_pb2.LEGAL_BASIS_CONSENT
LI = common_pb2.LEGAL_BASIS_LEGITIMATE_INTEREST

PURPOSES = {
    "analytics": PurposeInfo(CONSENT, gpc_withdraws=False),
    "personalisation": PurposeInfo(CONSENT, gpc_withdraws=True),
    "profiling": PurposeInfo(CONSENT, gpc_withdraws=True),
    "marketing": PurposeInfo(CONSENT, gpc_withdraws=True),
}
OUR_VENDOR = 755
ALL_PURPOSES = frozenset(range(1, 12))


def tc(**fields: Any) -> TCString:
    """A decoded TC string that consents to nothing unless told otherwise."""
    base = TCString(
        text="(built in the test)",
        version=2,
        created=datetime(2025, 3, 1, tzinfo=UTC),
        last_updated=datetime(2025, 3, 1, tzinfo=UTC),
        cmp_id=300,
        cmp_version=1,
        consent_screen=1,
        consent_language="EN",
        vendor_list_version=88,
        policy_version=4,
        is_service_specific=True,
        use_non_standard_texts=False,
        special_feature_opt_ins=frozenset(),
        purpose_consents=frozenset(),
        purpose_legitimate_interests=frozenset(),
        purpose_one_treatment=False,
        publisher_cc="DE",
        vendor_consents=frozenset(),
        vendor_legitimate_interests=frozenset(),
        publisher_restrictions=(),
        disclosed_vendors=None,
        publisher_tc=None,
    )
    return dataclasses.replace(base, **fields)


def by_purpose(decisions: list[SignalDecision]) -> dict[str, SignalDecision]:
    return {d.purpose: d for d in decisions}


def outcome(decisions: list[SignalDecision]) -> dict[str, int]:
    return {d.purpose: d.decision for d in decisions}


# Mappings ---------------------------------------------------------------------------------------


def test_default_tcf_mapping_follows_the_tcf_2_2_purposes() -> None:
    mapping = TcfMapping()
    assert mapping.vendor_id == 0
    assert dict(mapping.purposes) == {
        "analytics": (1, 8, 9),
        "personalisation": (1, 5, 6),
        "profiling": (1, 3, 5),
        "marketing": (1, 2, 3, 4, 7),
    }
    assert dict(DEFAULT_TCF_PURPOSES) == dict(mapping.purposes)


def test_default_consent_mode_mapping() -> None:
    assert dict(ConsentModeMapping().purposes) == {
        "analytics": ("analytics_storage",),
        "marketing": ("ad_storage", "ad_user_data", "ad_personalization"),
    }
    assert dict(DEFAULT_CONSENT_MODE_PURPOSES) == dict(ConsentModeMapping().purposes)


def test_mappings_are_configurable_and_frozen() -> None:
    mapping = TcfMapping(vendor_id=OUR_VENDOR, purposes={"analytics": [9, 8, 8]})
    assert mapping.purposes == {"analytics": (8, 9)}
    with pytest.raises(TypeError):
        mapping.purposes["marketing"] = (1,)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mapping.vendor_id = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vendor_id": -1},
        {"vendor_id": 65_536},
        {"purposes": {"analytics": []}},
        {"purposes": {"analytics": [0]}},
        {"purposes": {"analytics": [25]}},
        {"purposes": {"Analytics": [1]}},
    ],
)
def test_bad_tcf_mappings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TcfMapping(**kwargs)


@pytest.mark.parametrize(
    "purposes",
    [{"analytics": []}, {"analytics": ["functionality_storage"]}, {"a-b": ["ad_storage"]}],
)
def test_bad_consent_mode_mappings_are_refused(purposes: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError):
        ConsentModeMapping(purposes)


# TCF --------------------------------------------------------------------------------------------


def test_tcf_grants_a_purpose_when_every_mapped_tcf_purpose_has_consent() -> None:
    decisions = decisions_from_signals(
        tc(purpose_consents=frozenset({1, 8, 9})), None, None, PURPOSES
    )
    analytics = by_purpose(decisions)["analytics"]
    assert analytics == SignalDecision(
        "analytics",
        GRANTED,
        "tcf",
        {
            "tcf_purposes": "1,8,9",
            "basis": "consent",
            "source": "core",
            "vendor_id": "0",
            "cmp_id": "300",
            "policy_version": "4",
            "vendor_list_version": "88",
        },
    )
    assert outcome(decisions) == {
        "analytics": GRANTED,
        "personalisation": DENIED,
        "profiling": DENIED,
        "marketing": DENIED,
    }
    assert by_purpose(decisions)["marketing"].detail["unmet"] == "2,3,4,7"


def test_tcf_denies_when_one_mapped_purpose_lacks_consent() -> None:
    decisions = decisions_from_signals(tc(purpose_consents=frozenset({1, 8})), None, None, PURPOSES)
    analytics = by_purpose(decisions)["analytics"]
    assert analytics.decision == DENIED
    assert analytics.detail["unmet"] == "9"


def test_tcf_all_purposes_consented_grants_every_mapped_purpose() -> None:
    decisions = decisions_from_signals(tc(purpose_consents=ALL_PURPOSES), None, None, PURPOSES)
    assert set(outcome(decisions).values()) == {GRANTED}


def test_legitimate_interest_counts_only_for_legitimate_interest_purposes() -> None:
    signal = tc(purpose_consents=frozenset({1}), purpose_legitimate_interests=frozenset({8, 9}))
    as_consent = decisions_from_signals(signal, None, None, PURPOSES)
    as_li = decisions_from_signals(
        signal, None, None, {"analytics": PurposeInfo(LI, gpc_withdraws=False)}
    )
    assert by_purpose(as_consent)["analytics"].decision == DENIED
    assert by_purpose(as_li)["analytics"].decision == GRANTED
    assert by_purpose(as_li)["analytics"].detail["basis"] == "consent_or_legitimate_interest"


@pytest.mark.parametrize("tcf_purpose", [1, 3, 4, 5, 6])
def test_legitimate_interest_never_meets_purposes_1_3_4_5_6(tcf_purpose: int) -> None:
    signal = tc(purpose_legitimate_interests=ALL_PURPOSES)
    mapping = TcfMapping(purposes={"profiling": [tcf_purpose]})
    decisions = decisions_from_signals(
        signal, None, None, {"profiling": PurposeInfo(LI, gpc_withdraws=True)}, mapping
    )
    assert outcome(decisions) == {"profiling": DENIED}


@pytest.mark.parametrize("tcf_purpose", [2, 7, 8, 9, 10, 11])
def test_legitimate_interest_meets_the_other_purposes(tcf_purpose: int) -> None:
    mapping = TcfMapping(purposes={"analytics": [tcf_purpose]})
    decisions = decisions_from_signals(
        tc(purpose_legitimate_interests=ALL_PURPOSES),
        None,
        None,
        {"analytics": PurposeInfo(LI, gpc_withdraws=False)},
        mapping,
    )
    assert outcome(decisions) == {"analytics": GRANTED}


def test_with_a_vendor_id_our_vendor_must_have_consent_too() -> None:
    mapping = TcfMapping(vendor_id=OUR_VENDOR)
    without = tc(purpose_consents=ALL_PURPOSES, vendor_consents=frozenset({1, 2}))
    with_us = dataclasses.replace(without, vendor_consents=frozenset({1, OUR_VENDOR}))
    assert set(
        outcome(decisions_from_signals(without, None, None, PURPOSES, mapping)).values()
    ) == {DENIED}
    granted = decisions_from_signals(with_us, None, None, PURPOSES, mapping)
    assert set(outcome(granted).values()) == {GRANTED}
    assert granted[0].detail["source"] == "vendor"
    assert granted[0].detail["vendor_id"] == str(OUR_VENDOR)


def test_vendor_legitimate_interest_meets_legitimate_interest_purposes() -> None:
    mapping = TcfMapping(vendor_id=OUR_VENDOR, purposes={"analytics": [1, 8, 9]})
    purposes = {"analytics": PurposeInfo(LI, gpc_withdraws=False)}
    signal = tc(
        purpose_consents=frozenset({1}),
        purpose_legitimate_interests=frozenset({8, 9}),
        vendor_consents=frozenset({OUR_VENDOR}),
        vendor_legitimate_interests=frozenset({OUR_VENDOR}),
    )
    assert outcome(decisions_from_signals(signal, None, None, purposes, mapping)) == {
        "analytics": GRANTED
    }
    no_vendor_li = dataclasses.replace(signal, vendor_legitimate_interests=frozenset())
    assert outcome(decisions_from_signals(no_vendor_li, None, None, purposes, mapping)) == {
        "analytics": DENIED
    }


@pytest.mark.parametrize(
    ("restriction", "consent_path", "li_path"),
    [
        (RestrictionType.NOT_ALLOWED, DENIED, DENIED),
        (RestrictionType.REQUIRE_CONSENT, GRANTED, DENIED),
        (RestrictionType.REQUIRE_LEGITIMATE_INTEREST, DENIED, GRANTED),
    ],
)
def test_publisher_restrictions_on_our_vendor_apply(
    restriction: RestrictionType, consent_path: int, li_path: int
) -> None:
    mapping = TcfMapping(vendor_id=OUR_VENDOR, purposes={"analytics": [8]})
    purposes = {"analytics": PurposeInfo(LI, gpc_withdraws=False)}
    restricted = (PublisherRestriction(8, restriction, ((OUR_VENDOR, OUR_VENDOR),)),)
    by_consent = tc(
        purpose_consents=frozenset({8}),
        vendor_consents=frozenset({OUR_VENDOR}),
        publisher_restrictions=restricted,
    )
    by_li = tc(
        purpose_legitimate_interests=frozenset({8}),
        vendor_legitimate_interests=frozenset({OUR_VENDOR}),
        publisher_restrictions=restricted,
    )
    assert outcome(decisions_from_signals(by_consent, None, None, purposes, mapping)) == {
        "analytics": consent_path
    }
    assert outcome(decisions_from_signals(by_li, None, None, purposes, mapping)) == {
        "analytics": li_path
    }


def test_restrictions_on_other_vendors_do_not_apply_to_ours() -> None:
    mapping = TcfMapping(vendor_id=OUR_VENDOR, purposes={"analytics": [8]})
    signal = tc(
        purpose_consents=frozenset({8}),
        vendor_consents=frozenset({OUR_VENDOR}),
        publisher_restrictions=(
            PublisherRestriction(8, RestrictionType.NOT_ALLOWED, ((1, 2), (700, 754), (756, 900))),
        ),
    )
    assert outcome(decisions_from_signals(signal, None, None, PURPOSES, mapping)) == {
        "analytics": GRANTED
    }


def test_without_a_vendor_id_the_publisher_tc_segment_speaks_for_the_shop() -> None:
    publisher = PublisherTC(
        purpose_consents=frozenset({1, 8, 9}),
        purpose_legitimate_interests=frozenset(),
        custom_purpose_consents=frozenset(),
        custom_purpose_legitimate_interests=frozenset(),
    )
    signal = tc(purpose_consents=frozenset({1, 5, 6}), publisher_tc=publisher)
    decisions = by_purpose(decisions_from_signals(signal, None, None, PURPOSES))
    assert decisions["analytics"].decision == GRANTED
    assert decisions["analytics"].detail["source"] == "publisher_tc"
    assert decisions["personalisation"].decision == DENIED  # core consents are not the shop's


def test_purposes_not_defined_are_ignored_and_unmapped_ones_get_no_tcf_decision() -> None:
    purposes = {
        "analytics": PurposeInfo(CONSENT, gpc_withdraws=False),
        "loyalty": PurposeInfo(CONSENT, gpc_withdraws=False),
    }
    decisions = decisions_from_signals(tc(purpose_consents=ALL_PURPOSES), None, None, purposes)
    assert outcome(decisions) == {"analytics": GRANTED}


def test_a_real_tc_string_flows_through() -> None:
    # Core: purposes 1-11 consented, vendors 2 and 755 consented; publisher TC: purposes 1, 8, 9.
    text = "CQNnEPwQNrkMMEsAHBENBYEgAP_gAAAAAAYgF5wAgABALzAAAAA.cDAAAAAAAA"
    signal = parse_tc_string(text)
    assert signal.vendor_consents == {2, 755}
    assert signal.publisher_tc is not None
    shop = decisions_from_signals(signal, None, None, PURPOSES)
    assert outcome(shop) == {
        "analytics": GRANTED,
        "marketing": DENIED,
        "personalisation": DENIED,
        "profiling": DENIED,
    }
    vendor = decisions_from_signals(signal, None, None, PURPOSES, TcfMapping(vendor_id=755))
    assert set(outcome(vendor).values()) == {GRANTED}


# GPC --------------------------------------------------------------------------------------------


def test_gpc_withdraws_the_purposes_flagged_for_it() -> None:
    decisions = decisions_from_signals(None, True, None, PURPOSES)
    assert outcome(decisions) == {
        "marketing": WITHDRAWN,
        "personalisation": WITHDRAWN,
        "profiling": WITHDRAWN,
    }
    assert all(d.signal == "gpc" and d.detail == {"gpc": "true"} for d in decisions)


@pytest.mark.parametrize("gpc", [False, None])
def test_gpc_false_or_absent_says_nothing(gpc: bool | None) -> None:
    assert decisions_from_signals(None, gpc, None, PURPOSES) == []


# Consent Mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ({"analytics_storage": "granted"}, {"analytics": GRANTED}),
        ({"analytics_storage": "denied"}, {"analytics": DENIED}),
        (
            {"ad_storage": "granted", "ad_user_data": "granted", "ad_personalization": "granted"},
            {"marketing": GRANTED},
        ),
        (
            {"ad_storage": "granted", "ad_user_data": "denied", "ad_personalization": "granted"},
            {"marketing": DENIED},
        ),
        ({"ad_storage": "granted", "ad_user_data": "granted"}, {}),  # v1-style: incomplete
        ({"ad_personalization": "denied"}, {"marketing": DENIED}),
        ({}, {}),
    ],
)
def test_consent_mode_decides_analytics_and_marketing(
    mode: dict[str, str], expected: dict[str, int]
) -> None:
    assert outcome(decisions_from_signals(None, None, mode, PURPOSES)) == expected


def test_consent_mode_detail_says_what_was_sent() -> None:
    mode = {"ad_storage": "granted", "ad_user_data": "denied"}
    (marketing,) = decisions_from_signals(None, None, mode, PURPOSES)
    assert marketing.signal == "consent_mode"
    assert marketing.detail == {
        "ad_storage": "granted",
        "ad_user_data": "denied",
        "ad_personalization": "not_sent",
    }


def test_consent_mode_accepts_the_proto_message_and_enum_names() -> None:
    message = consent_pb2.ConsentModeSignals(
        analytics_storage=consent_pb2.CONSENT_MODE_VALUE_GRANTED,
        ad_storage=consent_pb2.CONSENT_MODE_VALUE_DENIED,
    )
    names = {
        "analytics_storage": "CONSENT_MODE_VALUE_GRANTED",
        "ad_storage": "CONSENT_MODE_VALUE_DENIED",
        "ad_user_data": "CONSENT_MODE_VALUE_UNSPECIFIED",
    }
    expected = {"analytics": GRANTED, "marketing": DENIED}
    assert outcome(decisions_from_signals(None, None, message, PURPOSES)) == expected
    assert outcome(decisions_from_signals(None, None, names, PURPOSES)) == expected


@pytest.mark.parametrize(
    ("mode", "field"),
    [
        ({"functionality_storage": "granted"}, "consent_mode.functionality_storage"),
        ({"ad_storage": "yes"}, "consent_mode.ad_storage"),
        ({"ad_storage": "Granted"}, "consent_mode.ad_storage"),
    ],
)
def test_unknown_consent_mode_fields_and_values_are_invalid(
    mode: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decisions_from_signals(None, None, mode, PURPOSES)
    assert [path for path, _ in caught.value.violations] == [field]


def test_consent_mode_mapping_is_configurable() -> None:
    mapping = ConsentModeMapping({"personalisation": ["ad_personalization"]})
    decisions = decisions_from_signals(
        None, None, {"ad_personalization": "granted"}, PURPOSES, consent_mode_mapping=mapping
    )
    assert outcome(decisions) == {"personalisation": GRANTED}


# Conflicts --------------------------------------------------------------------------------------


def test_gpc_beats_a_tcf_grant_and_records_what_it_overrode() -> None:
    decisions = by_purpose(
        decisions_from_signals(tc(purpose_consents=ALL_PURPOSES), True, None, PURPOSES)
    )
    marketing = decisions["marketing"]
    assert (marketing.decision, marketing.signal) == (WITHDRAWN, "gpc")
    assert marketing.detail == {"gpc": "true", "overridden": "tcf=granted"}
    assert decisions["analytics"].decision == GRANTED  # not flagged for GPC


def test_a_denial_beats_a_grant_whichever_signal_sends_it() -> None:
    granted_by_tcf = tc(purpose_consents=ALL_PURPOSES)
    decisions = decisions_from_signals(
        granted_by_tcf, None, {"analytics_storage": "denied"}, PURPOSES
    )
    analytics = by_purpose(decisions)["analytics"]
    assert (analytics.decision, analytics.signal) == (DENIED, "consent_mode")
    assert analytics.detail["overridden"] == "tcf=granted"

    decisions = decisions_from_signals(tc(), None, {"analytics_storage": "granted"}, PURPOSES)
    analytics = by_purpose(decisions)["analytics"]
    assert (analytics.decision, analytics.signal) == (DENIED, "tcf")
    assert analytics.detail["overridden"] == "consent_mode=granted"


def test_agreeing_signals_are_recorded_as_concurring() -> None:
    decisions = decisions_from_signals(
        tc(purpose_consents=ALL_PURPOSES),
        True,
        {"ad_storage": "denied"},
        PURPOSES,
    )
    marketing = by_purpose(decisions)["marketing"]
    assert marketing.signal == "gpc"
    # A denial is less than a withdrawal, so it too counts as overridden.
    assert marketing.detail["overridden"] == "tcf=granted,consent_mode=denied"
    assert "concurring" not in marketing.detail

    both_grant = decisions_from_signals(
        tc(purpose_consents=ALL_PURPOSES), None, {"analytics_storage": "granted"}, PURPOSES
    )
    analytics = by_purpose(both_grant)["analytics"]
    assert (analytics.signal, analytics.detail["concurring"]) == ("tcf", "consent_mode")
    assert "overridden" not in analytics.detail


decisions_strategy = st.sampled_from([GRANTED, DENIED])
modes = st.dictionaries(
    st.sampled_from(["ad_storage", "analytics_storage", "ad_user_data", "ad_personalization"]),
    st.sampled_from(["granted", "denied"]),
)


@settings(max_examples=150, deadline=None)
@given(
    consents=st.frozensets(st.integers(1, 11)),
    lis=st.frozensets(st.integers(1, 11)),
    gpc=st.sampled_from([True, False, None]),
    mode=modes,
    bases=st.lists(st.sampled_from([CONSENT, LI]), min_size=4, max_size=4),
    gpc_flags=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_no_signal_is_ever_overruled_by_a_less_protective_one(
    consents: frozenset[int],
    lis: frozenset[int],
    gpc: bool | None,
    mode: dict[str, str],
    bases: list[int],
    gpc_flags: list[bool],
) -> None:
    purposes = {
        name: PurposeInfo(basis, flag)  # type: ignore[arg-type]
        for name, basis, flag in zip(PURPOSES, bases, gpc_flags, strict=True)
    }
    signal = tc(purpose_consents=consents, purpose_legitimate_interests=lis)
    combined = by_purpose(decisions_from_signals(signal, gpc, mode, purposes))
    rank = {GRANTED: 1, DENIED: 2, WITHDRAWN: 3}
    alone = [
        decisions_from_signals(signal, None, None, purposes),
        decisions_from_signals(None, gpc, None, purposes),
        decisions_from_signals(None, None, mode, purposes),
    ]
    for decisions in alone:
        for single in decisions:
            assert rank[combined[single.purpose].decision] >= rank[single.decision]
    assert sorted(combined) == sorted({d.purpose for ds in alone for d in ds})
    if gpc:
        for name, info in purposes.items():
            if info.gpc_withdraws:
                assert combined[name].decision == WITHDRAWN


# Overriding GPC ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpc_withdrawn", "decision", "needs_acknowledgement"),
    [
        (True, GRANTED, True),
        (True, DENIED, False),
        (True, WITHDRAWN, False),
        (False, GRANTED, False),
        (False, DENIED, False),
    ],
)
def test_only_a_grant_over_a_gpc_withdrawal_needs_acknowledgement(
    gpc_withdrawn: bool, decision: int, needs_acknowledgement: bool
) -> None:
    assert (
        requires_gpc_acknowledgement(gpc_withdrawn, decision)  # type: ignore[arg-type]
        is needs_acknowledgement
    )


def test_gpc_conflict_violation_names_the_purpose() -> None:
    kind, subject, description = gpc_conflict_violation("marketing")
    assert (kind, subject) == ("GPC", "purposes/marketing")
    assert "acknowledge_gpc_conflict" in description
