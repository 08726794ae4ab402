"""Strict TC string parsing: real strings built bit by bit, and every way to break one.

The strings are made by a small test-only encoder following the IAB TCF v2 field layout, so each
test controls every field: bit field and range vendor encodings, publisher restrictions, the
disclosed vendors and publisher TC segments, and the padding conventions of different encoders.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.consent.tcf import (
    LEGITIMATE_INTEREST_EXCLUDED_PURPOSES,
    MAX_PADDING_BITS,
    PublisherRestriction,
    PublisherTC,
    RestrictionType,
    TCString,
    TCStringError,
    parse_tc_string,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# A test-only encoder ---------------------------------------------------------------------------


class BitWriter:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def uint(self, value: int, width: int) -> BitWriter:
        assert 0 <= value < 1 << width, (value, width)
        if width:
            self.parts.append(format(value, f"0{width}b"))
        return self

    def flag(self, value: bool) -> BitWriter:
        return self.uint(int(value), 1)

    def letters(self, code: str) -> BitWriter:
        for char in code:
            self.uint(ord(char) - ord("A"), 6)
        return self

    def id_bits(self, ids: Iterable[int], width: int) -> BitWriter:
        chosen = set(ids)
        self.parts.append("".join("1" if i in chosen else "0" for i in range(1, width + 1)))
        return self

    def raw(self, bits: str) -> BitWriter:
        self.parts.append(bits)
        return self

    @property
    def bits(self) -> str:
        return "".join(self.parts)


def base64url(bits: str, pad_to: int = 6) -> str:
    """Pad with zeros to a multiple of ``pad_to`` bits (6: shortest, 8: bytes, 24: iabtcf-es)."""
    bits += "0" * (-len(bits) % pad_to)
    bits += "0" * (-len(bits) % 6)
    return "".join(ALPHABET[int(bits[i : i + 6], 2)] for i in range(0, len(bits), 6))


def bits_of(segment: str) -> str:
    return "".join(f"{ALPHABET.index(c):06b}" for c in segment)


def ranges_of(ids: Iterable[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for vendor in sorted(set(ids)):
        if ranges and ranges[-1][1] == vendor - 1:
            ranges[-1] = (ranges[-1][0], vendor)
        else:
            ranges.append((vendor, vendor))
    return ranges


def write_ranges(writer: BitWriter, ranges: Sequence[tuple[int, int]]) -> None:
    writer.uint(len(ranges), 12)
    for start, end in ranges:
        writer.flag(start != end).uint(start, 16)
        if start != end:
            writer.uint(end, 16)


def write_vendors(
    writer: BitWriter,
    ids: Iterable[int],
    *,
    ranges: bool,
    max_vendor_id: int | None = None,
    raw_ranges: Sequence[tuple[int, int]] | None = None,
) -> None:
    ids = sorted(set(ids))
    maximum = max(ids, default=0) if max_vendor_id is None else max_vendor_id
    writer.uint(maximum, 16).flag(ranges)
    if ranges:
        write_ranges(writer, ranges_of(ids) if raw_ranges is None else raw_ranges)
    else:
        writer.id_bits(ids, maximum)


def deciseconds(moment: datetime) -> int:
    return round(moment.timestamp() * 10)


Restriction = tuple[int, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class Core:
    """The fields of a core segment, with realistic defaults."""

    version: int = 2
    created: datetime = datetime(2025, 3, 1, 9, 30, 0, tzinfo=UTC)
    last_updated: datetime = datetime(2025, 3, 2, 18, 15, 42, tzinfo=UTC)
    cmp_id: int = 300
    cmp_version: int = 7
    consent_screen: int = 1
    consent_language: str = "EN"
    vendor_list_version: int = 88
    policy_version: int = 4
    is_service_specific: bool = True
    use_non_standard_texts: bool = False
    special_features: frozenset[int] = frozenset({1})
    purpose_consents: frozenset[int] = frozenset({1, 2, 3, 4, 7, 8, 9})
    purpose_lis: frozenset[int] = frozenset({2, 7, 8, 9, 10})
    purpose_one_treatment: bool = False
    publisher_cc: str = "DE"
    vendor_consents: frozenset[int] = frozenset({2, 6, 8, 755})
    vendor_lis: frozenset[int] = frozenset({8, 10, 11, 12})
    consent_ranges: bool = False
    li_ranges: bool = True
    restrictions: tuple[Restriction, ...] = ((2, 1, ((8, 8), (10, 20))),)

    def header(self) -> BitWriter:
        writer = BitWriter()
        writer.uint(self.version, 6)
        writer.uint(deciseconds(self.created), 36).uint(deciseconds(self.last_updated), 36)
        writer.uint(self.cmp_id, 12).uint(self.cmp_version, 12).uint(self.consent_screen, 6)
        writer.letters(self.consent_language).uint(self.vendor_list_version, 12)
        writer.uint(self.policy_version, 6)
        writer.flag(self.is_service_specific).flag(self.use_non_standard_texts)
        writer.id_bits(self.special_features, 12)
        writer.id_bits(self.purpose_consents, 24).id_bits(self.purpose_lis, 24)
        writer.flag(self.purpose_one_treatment).letters(self.publisher_cc)
        return writer

    def bits(self) -> str:
        writer = self.header()
        write_vendors(writer, self.vendor_consents, ranges=self.consent_ranges)
        write_vendors(writer, self.vendor_lis, ranges=self.li_ranges)
        write_restrictions(writer, self.restrictions)
        return writer.bits

    def encode(self, pad_to: int = 6) -> str:
        return base64url(self.bits(), pad_to)


def write_restrictions(writer: BitWriter, restrictions: Sequence[Restriction]) -> None:
    writer.uint(len(restrictions), 12)
    for purpose, restriction, ranges in restrictions:
        writer.uint(purpose, 6).uint(restriction, 2)
        write_ranges(writer, ranges)


def vendor_segment(
    ids: Iterable[int], *, segment_type: int = 1, ranges: bool = False, pad_to: int = 6
) -> str:
    writer = BitWriter().uint(segment_type, 3)
    write_vendors(writer, ids, ranges=ranges)
    return base64url(writer.bits, pad_to)


def publisher_segment(
    consents: Iterable[int] = (1, 7),
    lis: Iterable[int] = (2, 3, 8),
    custom_consents: Iterable[int] = (2,),
    custom_lis: Iterable[int] = (),
    custom_count: int = 3,
    pad_to: int = 6,
) -> str:
    writer = BitWriter().uint(3, 3).id_bits(consents, 24).id_bits(lis, 24)
    writer.uint(custom_count, 6).id_bits(custom_consents, custom_count)
    writer.id_bits(custom_lis, custom_count)
    return base64url(writer.bits, pad_to)


def refused(text: str) -> str:
    with pytest.raises(TCStringError) as caught:
        parse_tc_string(text)
    return caught.value.reason


CORE = Core().encode()
DISCLOSED = vendor_segment({2, 6, 8, 9, 755})
PUBLISHER = publisher_segment()


# Valid strings decode to what they encode ------------------------------------------------------


def test_core_segment_with_bit_field_and_range_vendors_decodes_every_field() -> None:
    parsed = parse_tc_string(CORE)

    assert parsed.text == CORE
    assert parsed.version == 2
    assert parsed.created == datetime(2025, 3, 1, 9, 30, 0, tzinfo=UTC)
    assert parsed.last_updated == datetime(2025, 3, 2, 18, 15, 42, tzinfo=UTC)
    assert (parsed.cmp_id, parsed.cmp_version, parsed.consent_screen) == (300, 7, 1)
    assert (parsed.consent_language, parsed.publisher_cc) == ("EN", "DE")
    assert (parsed.vendor_list_version, parsed.policy_version) == (88, 4)
    assert parsed.is_service_specific and not parsed.use_non_standard_texts
    assert not parsed.purpose_one_treatment
    assert parsed.special_feature_opt_ins == {1}
    assert parsed.purpose_consents == {1, 2, 3, 4, 7, 8, 9}
    assert parsed.purpose_legitimate_interests == {2, 7, 8, 9, 10}
    assert parsed.vendor_consents == {2, 6, 8, 755}
    assert parsed.vendor_legitimate_interests == {8, 10, 11, 12}
    assert parsed.publisher_restrictions == (
        PublisherRestriction(2, RestrictionType.REQUIRE_CONSENT, ((8, 8), (10, 20))),
    )
    assert parsed.disclosed_vendors is None and parsed.publisher_tc is None


def test_range_encoded_consents_and_bit_field_legitimate_interests_decode() -> None:
    core = Core(
        vendor_consents=frozenset({1, 2, 3, 50, 51, 900}),
        vendor_lis=frozenset({4, 99}),
        consent_ranges=True,
        li_ranges=False,
        restrictions=(),
    )
    parsed = parse_tc_string(core.encode())
    assert parsed.vendor_consents == {1, 2, 3, 50, 51, 900}
    assert parsed.vendor_legitimate_interests == {4, 99}
    assert parsed.publisher_restrictions == ()


def test_empty_vendor_sections_decode_as_empty_sets() -> None:
    core = Core(vendor_consents=frozenset(), vendor_lis=frozenset(), li_ranges=False)
    parsed = parse_tc_string(core.encode())
    assert parsed.vendor_consents == frozenset()
    assert parsed.vendor_legitimate_interests == frozenset()


def test_disclosed_vendors_and_publisher_tc_segments_decode() -> None:
    parsed = parse_tc_string(f"{CORE}.{DISCLOSED}.{PUBLISHER}")
    assert parsed.disclosed_vendors == frozenset({2, 6, 8, 9, 755})
    assert parsed.publisher_tc == PublisherTC(
        purpose_consents=frozenset({1, 7}),
        purpose_legitimate_interests=frozenset({2, 3, 8}),
        custom_purpose_consents=frozenset({2}),
        custom_purpose_legitimate_interests=frozenset(),
    )


def test_range_encoded_disclosed_vendors_decode() -> None:
    vendors = frozenset({1, 2, 3, 4, 10, 6000})
    segment = vendor_segment(vendors, ranges=True)
    assert parse_tc_string(f"{CORE}.{segment}").disclosed_vendors == vendors


def test_optional_segments_may_come_in_any_order_after_the_core() -> None:
    forward = parse_tc_string(f"{CORE}.{DISCLOSED}.{PUBLISHER}")
    backward = parse_tc_string(f"{CORE}.{PUBLISHER}.{DISCLOSED}")
    assert dataclasses.replace(backward, text=forward.text) == forward


def test_allowed_vendors_segment_is_validated_then_ignored() -> None:
    allowed = vendor_segment({5, 6}, segment_type=2)
    parsed = parse_tc_string(f"{CORE}.{allowed}.{DISCLOSED}")
    assert parsed.disclosed_vendors == frozenset({2, 6, 8, 9, 755})
    broken = base64url(BitWriter().uint(2, 3).uint(40, 16).flag(False).bits)  # 40 bits missing
    assert "segment 2 (allowed vendors)" in refused(f"{CORE}.{broken}")


@pytest.mark.parametrize("pad_to", [6, 8, 24], ids=["shortest", "bytes", "iabtcf-es"])
def test_every_encoders_padding_convention_is_accepted(pad_to: int) -> None:
    text = ".".join(
        [
            Core().encode(pad_to),
            vendor_segment({3, 4}, pad_to=pad_to),
            publisher_segment(pad_to=pad_to),
        ]
    )
    parsed = parse_tc_string(text)
    assert parsed.vendor_consents == {2, 6, 8, 755}
    assert parsed.disclosed_vendors == frozenset({3, 4})


@pytest.mark.parametrize("policy_version", [4, 5, 63])
def test_tcf_2_2_and_later_policy_versions_are_accepted(policy_version: int) -> None:
    parsed = parse_tc_string(Core(policy_version=policy_version).encode())
    assert parsed.policy_version == policy_version


@pytest.mark.parametrize("policy_version", [0, 1, 2, 3])
def test_policy_versions_before_tcf_2_2_are_refused(policy_version: int) -> None:
    reason = refused(Core(policy_version=policy_version).encode())
    assert reason == (
        f"TCF policy version {policy_version} predates TCF 2.2 (version 4 or later is required)"
    )


def test_iab_gpp_reference_encoder_default_string_is_well_formed_but_predates_tcf_2_2() -> None:
    # The default TCF EU v2 section written by IAB Tech Lab's GPP library (iabgpp-es tests):
    # allowed vendors before disclosed vendors, policy version 2.
    reason = refused("CPSG_8APSG_8AAAAAAENAACAAAAAAAAAAAAAAAAAAAAA.QAAA.IAAA")
    assert reason.startswith("TCF policy version 2 predates TCF 2.2")


@pytest.mark.parametrize(
    "text",
    [
        # Examples in IAB's "Consent string and vendor list formats v2" document (v1 encoded).
        "BObdrPUOevsguAfDqFENCNAAAAAmeAAA.PVAfDObdrA.DqFENCAmeAENCDA.OevsguAfDq",
        "BObdrPUOevsguAfDqFENCNAAAAAmeAAA.OevsguAfDq",
        "BOPnWgIOPnWgIAAABAENAI4AAAAA0ABA",
    ],
)
def test_iab_specification_examples_are_refused_as_version_1(text: str) -> None:
    assert refused(text) == "core segment version is 1, expected 2"


def test_the_error_is_an_invalid_argument_on_the_tcf_string_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_tc_string("")
    assert list(caught.value.violations) == [("tcf_string", "the TC string is empty")]
    assert str(caught.value) == "the TC string is empty"


# Legitimate interest under TCF 2.2 -------------------------------------------------------------


def test_legitimate_interest_never_counts_for_purposes_1_3_4_5_6() -> None:
    parsed = parse_tc_string(Core(purpose_lis=frozenset(range(1, 12))).encode())
    assert parsed.purpose_legitimate_interests == set(range(1, 12))
    counted = {p for p in range(1, 12) if parsed.has_purpose_legitimate_interest(p)}
    assert counted == {2, 7, 8, 9, 10, 11}
    assert {1, 3, 4, 5, 6} == LEGITIMATE_INTEREST_EXCLUDED_PURPOSES


def test_publisher_legitimate_interest_follows_the_same_policy() -> None:
    segment = publisher_segment(lis=range(1, 12))
    publisher = parse_tc_string(f"{CORE}.{segment}").publisher_tc
    assert publisher is not None
    assert {p for p in range(1, 12) if publisher.has_purpose_legitimate_interest(p)} == {
        2,
        7,
        8,
        9,
        10,
        11,
    }


def test_the_widest_legal_publisher_restrictions_stay_ranges() -> None:
    restrictions = tuple((n % 24 + 1, 0, ((1, 65_535),)) for n in range(4095))
    parsed = parse_tc_string(Core(restrictions=restrictions).encode())
    assert len(parsed.publisher_restrictions) == 4095
    assert parsed.publisher_restrictions[0].vendor_ranges == ((1, 65_535),)
    assert parsed.restrictions_for(65_535, 24) == {RestrictionType.NOT_ALLOWED}


def test_restrictions_for_names_what_applies_to_one_vendor_and_purpose() -> None:
    core = Core(restrictions=((2, 1, ((8, 8),)), (2, 0, ((5, 9),)), (7, 2, ((8, 8),))))
    parsed = parse_tc_string(core.encode())
    assert parsed.restrictions_for(8, 2) == {
        RestrictionType.REQUIRE_CONSENT,
        RestrictionType.NOT_ALLOWED,
    }
    assert parsed.restrictions_for(8, 7) == {RestrictionType.REQUIRE_LEGITIMATE_INTEREST}
    assert parsed.restrictions_for(10, 2) == frozenset()


# Refusals: syntax and segments -----------------------------------------------------------------


def test_empty_string_is_refused() -> None:
    assert refused("") == "the TC string is empty"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (".", "segment 1 is empty"),
        (f"{CORE}.", "segment 2 is empty"),
        (f".{CORE}", "segment 1 is empty"),
        (f"{CORE}..{DISCLOSED}", "segment 2 is empty"),
    ],
)
def test_empty_segments_are_refused(text: str, reason: str) -> None:
    assert refused(text) == reason


@pytest.mark.parametrize("bad", ["+", "/", " ", "\n", "\t", "*", "é", "\x00", "%2B"])
@pytest.mark.parametrize("segment", [1, 2])
def test_characters_outside_base64url_are_refused(bad: str, segment: int) -> None:
    parts = [CORE, DISCLOSED]
    parts[segment - 1] = parts[segment - 1][:10] + bad + parts[segment - 1][10:]
    assert refused(".".join(parts)).startswith(f"segment {segment} is not base64url")


@pytest.mark.parametrize("text", [f" {CORE}", f"{CORE}\n", f"{CORE}=", f"{CORE}==", f"{CORE}.Q=="])
def test_padding_and_surrounding_whitespace_are_refused(text: str) -> None:
    assert "is not base64url without padding" in refused(text)


def test_standard_base64_alphabet_is_refused() -> None:
    standard = CORE.replace("-", "+").replace("_", "/")
    if standard == CORE:  # make sure the string holds a character that differs
        standard = CORE[:-1] + "+"
    assert "is not base64url" in refused(standard)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            f"{DISCLOSED}.{CORE}",
            "segment 1 is a disclosed vendors segment; the core segment must come first",
        ),
        (
            f"{PUBLISHER}.{CORE}",
            "segment 1 is a publisher TC segment; the core segment must come first",
        ),
        (f"{CORE}.{CORE}", "segment 2 is a core segment; the core segment must come first, once"),
        (
            f"{CORE}.{DISCLOSED}.{CORE}",
            "segment 3 is a core segment; the core segment must come first, once",
        ),
    ],
)
def test_wrongly_ordered_segments_are_refused(text: str, reason: str) -> None:
    assert refused(text) == reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"{CORE}.{DISCLOSED}.{DISCLOSED}", "segment type 1 (disclosed vendors) appears twice"),
        (f"{CORE}.{PUBLISHER}.{PUBLISHER}", "segment type 3 (publisher TC) appears twice"),
        (
            f"{CORE}.{DISCLOSED}.{PUBLISHER}.{vendor_segment({1})}",
            "segment type 1 (disclosed vendors) appears twice",
        ),
    ],
)
def test_duplicated_segments_are_refused(text: str, reason: str) -> None:
    assert refused(text) == reason


@pytest.mark.parametrize("segment_type", [4, 5, 6, 7])
def test_unknown_segment_types_are_refused(segment_type: int) -> None:
    segment = vendor_segment({1}, segment_type=segment_type)
    assert refused(f"{CORE}.{segment}") == f"segment 2 has unknown segment type {segment_type}"


@pytest.mark.parametrize("version", [0, 1, 3, 63])
def test_other_format_versions_are_refused(version: int) -> None:
    assert refused(Core(version=version).encode()) == (
        f"core segment version is {version}, expected 2"
    )


def test_letters_outside_a_to_z_are_refused() -> None:
    bits = Core().bits()
    language_at = 6 + 36 + 36 + 12 + 12 + 6
    bits = bits[:language_at] + "111111" + bits[language_at + 6 :]
    assert refused(base64url(bits)) == (
        "core segment: letter 1 of ConsentLanguage is 63, not A to Z (0 to 25)"
    )


def test_overlong_strings_are_refused_before_decoding() -> None:
    assert refused("C" * 70_000) == "the TC string is longer than 65536 characters"


# Refusals: bit lengths -------------------------------------------------------------------------


def test_a_truncation_that_iab_tcf_reads_as_consent_to_everything_is_refused() -> None:
    import iab_tcf

    cut = CORE[:20]  # 120 bits: the string ends before the purposes
    assert all(iab_tcf.decode(cut).purposes_consent.values())  # why we measure first
    assert refused(cut) == (
        "core segment is 120 bits but its fields need at least 138 "
        "(it ends inside TcfPolicyVersion)"
    )


def test_truncated_core_names_the_bits_it_has_and_needs() -> None:
    text = Core(restrictions=()).encode()
    needed = len(Core(restrictions=()).bits())
    cut = text[: needed // 6 - 10]
    reason = refused(cut)
    assert reason.startswith(f"core segment is {len(cut) * 6} bits but its fields need")


def test_bit_field_longer_than_the_segment_is_refused_with_exact_counts() -> None:
    # MaxVendorId says 400 vendors; the disclosed vendors segment holds bits for 100.
    writer = BitWriter().uint(1, 3).uint(400, 16).flag(False).id_bits({3, 99}, 100)
    segment = base64url(writer.bits)
    assert refused(f"{CORE}.{segment}") == (
        f"segment 2 (disclosed vendors) is {len(segment) * 6} bits but its fields need 420"
    )


def test_vendor_consent_bit_field_shorter_than_declared_is_refused() -> None:
    core = Core(li_ranges=False, restrictions=())
    writer = core.header()
    writer.uint(500, 16).flag(False).id_bits({2, 6}, 100)  # 400 vendor bits missing
    reason = refused(base64url(writer.bits))
    assert reason.startswith("core segment is")
    assert "but its fields need at least" in reason


def test_bit_field_shorter_than_the_data_that_follows_is_refused() -> None:
    # MaxVendorId says 10 vendors but 60 vendor bits follow, vendor 50 among them.
    writer = BitWriter().uint(1, 3).uint(10, 16).flag(False).id_bits({3, 50}, 60)
    reason = refused(f"{CORE}.{base64url(writer.bits)}")
    assert reason.startswith("segment 2 (disclosed vendors) is")
    assert "at most 23 bits of padding" in reason or "non-zero padding" in reason


def test_core_with_trailing_data_is_refused() -> None:
    core = Core()
    assert "at most 23 bits of padding" in refused(base64url(core.bits() + "0" * 30))
    assert refused(base64url(core.bits() + "0001")) == (
        f"core segment has non-zero padding after bit {len(core.bits())}"
    )


def test_too_much_zero_padding_is_refused() -> None:
    assert f"(at most {MAX_PADDING_BITS} bits of padding are allowed)" in refused(CORE + "AAAA")
    assert "bits of padding" in refused(f"{CORE}.{DISCLOSED}AAAA")


def test_range_section_with_fewer_entries_than_declared_is_refused() -> None:
    writer = BitWriter().uint(1, 3).uint(90, 16).flag(True).uint(3, 12)
    writer.flag(False).uint(5, 16).flag(True).uint(10, 16).uint(20, 16)  # 2 of 3 entries
    reason = refused(f"{CORE}.{base64url(writer.bits)}")
    assert "but its fields need at least" in reason
    assert "range entry 3 of the vendor section" in reason


@pytest.mark.parametrize(
    ("ranges", "maximum", "reason"),
    [
        ([(10, 20), (5, 6)], 30, "vendor range entries are out of order in the vendor section"),
        ([(10, 20), (10, 12)], 30, "vendor range entries are out of order in the vendor section"),
        ([(10, 20), (15, 25)], 30, "vendor range entries overlap in the vendor section"),
        ([(10, 20), (20, 20)], 30, "vendor range entries overlap in the vendor section"),
        ([(10, 20), (25, 40)], 30, "the vendor section names vendor 40, beyond its MaxVendorId 30"),
        ([(0, 3)], 30, "range entry 1 of the vendor section names vendor 0"),
        ([(9, 4)], 30, "range entry 1 of the vendor section ends (4) before it starts (9)"),
    ],
)
def test_malformed_vendor_ranges_are_refused(
    ranges: list[tuple[int, int]], maximum: int, reason: str
) -> None:
    writer = BitWriter().uint(1, 3)
    write_vendors(writer, (), ranges=True, max_vendor_id=maximum, raw_ranges=ranges)
    assert reason in refused(f"{CORE}.{base64url(writer.bits)}")


def test_malformed_core_vendor_ranges_are_refused() -> None:
    writer = Core().header()
    write_vendors(writer, (), ranges=True, max_vendor_id=100, raw_ranges=[(50, 60), (55, 70)])
    write_vendors(writer, (), ranges=False)
    write_restrictions(writer, ())
    assert refused(base64url(writer.bits)) == (
        "core segment: vendor range entries overlap in the vendor consent section "
        "(entry 2 starts at 55, inside 50-60)"
    )


@pytest.mark.parametrize(
    ("restriction", "reason"),
    [
        ((2, 3, ((1, 1),)), "publisher restriction 1 has restriction type 3, which is undefined"),
        ((0, 1, ((1, 1),)), "publisher restriction 1 names purpose 0"),
        ((25, 1, ((1, 1),)), "publisher restriction 1 names purpose 25"),
        ((2, 1, ((5, 9), (1, 2))), "vendor range entries are out of order"),
        ((2, 1, ((5, 9), (9, 12))), "vendor range entries overlap"),
    ],
)
def test_malformed_publisher_restrictions_are_refused(
    restriction: Restriction, reason: str
) -> None:
    assert reason in refused(Core(restrictions=(restriction,)).encode())


def test_truncated_publisher_restrictions_are_refused() -> None:
    writer = Core().header()
    write_vendors(writer, (1,), ranges=False)
    write_vendors(writer, (), ranges=False)
    writer.uint(2, 12).uint(2, 6).uint(1, 2)  # two restrictions announced, one half written
    assert "it ends inside the NumEntries of publisher restriction 1" in refused(
        base64url(writer.bits)
    )


@pytest.mark.parametrize("custom_count", [0, 5, 63])
def test_publisher_tc_length_follows_its_custom_purpose_count(custom_count: int) -> None:
    ok = publisher_segment(custom_count=custom_count, custom_consents=(), custom_lis=())
    assert parse_tc_string(f"{CORE}.{ok}").publisher_tc is not None
    # The count announces custom purpose bits that are not there.
    announced = max(custom_count, 20)
    short = base64url(BitWriter().uint(3, 3).uint(0, 48).uint(announced, 6).bits)
    assert "segment 2 (publisher TC) is" in refused(f"{CORE}.{short}")


# Properties ------------------------------------------------------------------------------------

vendor_ids = st.frozensets(st.integers(1, 400), max_size=12)
purpose_ids = st.frozensets(st.integers(1, 24), max_size=24)
ranges_strategy = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)), max_size=3).map(
    lambda pairs: tuple(ranges_of(v for s, n in pairs for v in range(s, s + n + 1)))
)
restrictions_strategy = st.lists(
    st.tuples(st.integers(1, 11), st.integers(0, 2), ranges_strategy), max_size=3
).map(tuple)

cores = st.builds(
    Core,
    created=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.replace(microsecond=0)),
    cmp_id=st.integers(1, 4095),
    policy_version=st.integers(4, 63),
    consent_language=st.sampled_from(["EN", "DE", "FR", "PL"]),
    special_features=st.frozensets(st.integers(1, 12)),
    purpose_consents=purpose_ids,
    purpose_lis=purpose_ids,
    vendor_consents=vendor_ids,
    vendor_lis=vendor_ids,
    consent_ranges=st.booleans(),
    li_ranges=st.booleans(),
    restrictions=restrictions_strategy,
)


@st.composite
def tc_strings(draw: st.DrawFn) -> tuple[str, Core]:
    core = draw(cores)
    pad_to = draw(st.sampled_from([6, 8, 24]))
    segments = [core.encode(pad_to)]
    optional = []
    if draw(st.booleans()):
        optional.append(vendor_segment(draw(vendor_ids), ranges=draw(st.booleans()), pad_to=pad_to))
    if draw(st.booleans()):
        optional.append(publisher_segment(draw(purpose_ids), draw(purpose_ids), pad_to=pad_to))
    segments += draw(st.permutations(optional))
    return ".".join(segments), core


@settings(max_examples=150, deadline=None)
@given(tc_strings())
def test_generated_strings_decode_to_what_was_encoded(case: tuple[str, Core]) -> None:
    text, core = case
    parsed = parse_tc_string(text)
    assert parsed.created == core.created
    assert parsed.cmp_id == core.cmp_id
    assert parsed.policy_version == core.policy_version
    assert parsed.consent_language == core.consent_language
    assert parsed.special_feature_opt_ins == core.special_features
    assert parsed.purpose_consents == core.purpose_consents
    assert parsed.purpose_legitimate_interests == core.purpose_lis
    assert parsed.vendor_consents == core.vendor_consents
    assert parsed.vendor_legitimate_interests == core.vendor_lis
    assert [(r.purpose, r.restriction.value) for r in parsed.publisher_restrictions] == [
        (purpose, kind) for purpose, kind, _ in core.restrictions
    ]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_cut_inside_a_segment_is_refused(data: st.DataObject) -> None:
    # Shortest-padding strings: every character carries field bits, so any cut loses some.
    core = data.draw(cores)
    text = ".".join([core.encode(), vendor_segment(data.draw(vendor_ids)), publisher_segment()])
    cut = data.draw(
        st.integers(0, len(text) - 1).filter(lambda c: text[c] != "."), label="cut point"
    )
    with pytest.raises(TCStringError):
        parse_tc_string(text[:cut])


def test_every_cut_of_one_string_is_refused_exhaustively() -> None:
    text = f"{CORE}.{DISCLOSED}.{PUBLISHER}"
    for cut in range(len(text)):
        if text[cut] != ".":
            with pytest.raises(TCStringError):
                parse_tc_string(text[:cut])


_TIMESTAMP_BITS = range(6, 6 + 36 + 36)  # iab-tcf keeps whole seconds of the deciseconds
_FIXED_LAYOUT_BITS = range(213)  # Version … PublisherCC: every bit decodes to some field


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_flipping_a_bit_of_the_core_yields_a_different_string_or_a_refusal(
    data: st.DataObject,
) -> None:
    text, _ = data.draw(tc_strings())
    core, _, rest = text.partition(".")
    original = parse_tc_string(text)
    bits = bits_of(core)
    position = data.draw(st.integers(0, len(bits) - 1), label="flipped bit")
    flipped = bits[:position] + ("1" if bits[position] == "0" else "0") + bits[position + 1 :]
    mutated = base64url(flipped) + (f".{rest}" if rest else "")
    try:
        parsed = parse_tc_string(mutated)
    except TCStringError:
        return
    assert parsed.text != original.text
    # Vendor sections can say the same thing in another encoding (a longer MaxVendorId over
    # zero bits), so only the fixed layout must decode differently.
    if position in _FIXED_LAYOUT_BITS and position not in _TIMESTAMP_BITS:
        assert dataclasses.replace(parsed, text=text) != original


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET + ".=+/ ", max_size=120))
def test_arbitrary_text_is_decoded_or_refused_never_crashes(text: str) -> None:
    try:
        parsed = parse_tc_string(text)
    except TCStringError:
        return
    assert isinstance(parsed, TCString)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_arbitrary_bits_after_a_valid_header_are_decoded_or_refused(data: st.DataObject) -> None:
    header = Core().header().bits
    tail = data.draw(st.text(alphabet="01", max_size=400))
    with contextlib.suppress(TCStringError):
        parse_tc_string(base64url(header + tail))
