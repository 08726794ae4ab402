"""Strict reading of IAB TCF v2.2 TC strings.

`iab-tcf` decodes whatever it is given: it reads missing bits as zeros or ones, ignores trailing
data and never checks a range. So every string is first measured here, field by field, and only a
string whose every segment holds exactly the bits its own fields declare is handed to `iab-tcf`
for decoding. What counts as well formed:

- Segments are separated by ``.``; each is base64url without padding (``A-Z a-z 0-9 - _``
  only: no ``+``, ``/``, ``=``, whitespace, nor an empty segment); at most
  :data:`MAX_TC_STRING_LENGTH` characters in all.
- The core segment comes first (its Version field must be 2) and appears once. The other segments
  are identified by their 3-bit SegmentType: 1 disclosed vendors, 2 allowed vendors, 3 publisher
  TC; each at most once, in any order after the core (the IAB format calls them "optional and
  arbitrarily ordered", and IAB's own GPP encoder writes allowed vendors before disclosed
  vendors). Types 0 (a second core) and 4 to 7 are refused.
- Allowed vendors (type 2) served out-of-band signalling, which TCF 2.2 removed. It is still
  measured strictly, because encoders still emit it, and then ignored.
- Every field is measured: vendor sections are a bit field (MaxVendorId bits) or NumEntries range
  entries of 17 or 33 bits; publisher restrictions and the publisher TC segment likewise. A
  segment shorter than its fields need is truncated. After the fields a segment may carry at
  most :data:`MAX_PADDING_BITS` bits of padding, all zero: IAB's reference encoder (iabtcf-es)
  pads to a multiple of 24 bits (6-bit characters times 8-bit bytes), other encoders to a byte
  or to a character, and anything longer is data that no field accounts for.
- Range entries name vendors 1 and up, ascending and disjoint, and never beyond MaxVendorId.
  Letters (ConsentLanguage, PublisherCC) are A to Z. Publisher restrictions name a purpose from
  1 to 24 and a restriction type from 0 to 2 (3 is undefined).
- TcfPolicyVersion must be at least :data:`MIN_POLICY_VERSION` (4, TCF 2.2): older strings were
  collected under rules (legitimate interest for profiling purposes) that 2.2 withdrew, and IAB
  required CMPs to re-ask. Later versions (5 arrived with TCF 2.3) are accepted. The policy
  check comes after the structural checks, so the error names the policy only for a string that
  is otherwise well formed.

Cutting a valid string inside a segment, anywhere before its last field bit, always makes it
invalid; cutting only padding characters cannot be told apart from a shorter encoder's output,
and cutting at a ``.`` removes an optional segment.

TCF 2.2 policy: legitimate interest is never a legal basis for purposes 1, 3, 4, 5 and 6, whatever
the LI bits say (:meth:`TCString.has_purpose_legitimate_interest`). The raw bits stay available
as evidence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Final

import iab_tcf
from iab_tcf.v2 import NonCoreSegment

from services.common.errors import InvalidArgument

TCF_VERSION: Final = 2
MIN_POLICY_VERSION: Final = 4
MAX_PADDING_BITS: Final = 23
MAX_TC_STRING_LENGTH: Final = 65_536
MAX_PURPOSE_ID: Final = 24
LEGITIMATE_INTEREST_EXCLUDED_PURPOSES: Final = frozenset({1, 3, 4, 5, 6})
"""TCF 2.2: purposes for which legitimate interest never counts."""

_BASE64URL: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTETS: Final = {char: f"{index:06b}" for index, char in enumerate(_BASE64URL)}
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]+")

# Fixed-width core fields between Version and ConsentLanguage, and between ConsentLanguage and
# PublisherCC, as the format lays them out.
_CREATED_TO_SCREEN_BITS: Final = 36 + 36 + 12 + 12 + 6  # Created … ConsentScreen
_SERVICE_TO_P1T_BITS: Final = 1 + 1 + 12 + 24 + 24 + 1  # IsServiceSpecific … PurposeOneTreatment


class TCStringError(InvalidArgument):
    """A TC string that is not a well-formed TCF v2.2 string; INVALID_ARGUMENT on ``tcf_string``."""

    def __init__(self, reason: str) -> None:
        super().__init__([("tcf_string", reason)], reason)
        self.reason = reason


class SegmentType(IntEnum):
    CORE = 0
    DISCLOSED_VENDORS = 1
    ALLOWED_VENDORS = 2
    PUBLISHER_TC = 3


_SEGMENT_NAMES: Final = {
    SegmentType.CORE: "core",
    SegmentType.DISCLOSED_VENDORS: "disclosed vendors",
    SegmentType.ALLOWED_VENDORS: "allowed vendors",
    SegmentType.PUBLISHER_TC: "publisher TC",
}


class RestrictionType(IntEnum):
    """What a publisher restriction demands of the vendors it names, for one purpose."""

    NOT_ALLOWED = 0
    REQUIRE_CONSENT = 1
    REQUIRE_LEGITIMATE_INTEREST = 2


@dataclass(frozen=True, slots=True)
class PublisherRestriction:
    """Kept as ranges: 4095 restrictions of vendors 1-65535 fit in a legal string, their
    expansion would not fit in memory."""

    purpose: int
    restriction: RestrictionType
    vendor_ranges: tuple[tuple[int, int], ...]
    """Inclusive, ascending and disjoint."""

    def applies_to(self, vendor_id: int) -> bool:
        return any(start <= vendor_id <= end for start, end in self.vendor_ranges)


@dataclass(frozen=True, slots=True)
class PublisherTC:
    """The publisher's own purposes transparency and consent (segment type 3)."""

    purpose_consents: frozenset[int]
    purpose_legitimate_interests: frozenset[int]
    custom_purpose_consents: frozenset[int]
    custom_purpose_legitimate_interests: frozenset[int]

    def has_purpose_legitimate_interest(self, purpose: int) -> bool:
        """The LI bit, except for purposes where TCF 2.2 forbids legitimate interest."""
        return _legitimate_interest_counts(purpose, self.purpose_legitimate_interests)


@dataclass(frozen=True, slots=True)
class TCString:
    """A strictly validated TC string and what it says. Sets hold the ids whose bit is 1."""

    text: str
    version: int
    created: datetime
    last_updated: datetime
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_opt_ins: frozenset[int]
    purpose_consents: frozenset[int]
    purpose_legitimate_interests: frozenset[int]
    """As encoded; use :meth:`has_purpose_legitimate_interest` for what counts."""
    purpose_one_treatment: bool
    publisher_cc: str
    vendor_consents: frozenset[int]
    vendor_legitimate_interests: frozenset[int]
    publisher_restrictions: tuple[PublisherRestriction, ...]
    disclosed_vendors: frozenset[int] | None
    """None when the string has no disclosed vendors segment."""
    publisher_tc: PublisherTC | None
    """None when the string has no publisher TC segment."""

    def has_purpose_consent(self, purpose: int) -> bool:
        return purpose in self.purpose_consents

    def has_purpose_legitimate_interest(self, purpose: int) -> bool:
        """The LI bit, except for purposes where TCF 2.2 forbids legitimate interest."""
        return _legitimate_interest_counts(purpose, self.purpose_legitimate_interests)

    def restrictions_for(self, vendor_id: int, purpose: int) -> frozenset[RestrictionType]:
        """The publisher restrictions that apply to one vendor for one purpose."""
        return frozenset(
            r.restriction
            for r in self.publisher_restrictions
            if r.purpose == purpose and r.applies_to(vendor_id)
        )


def _legitimate_interest_counts(purpose: int, bits: frozenset[int]) -> bool:
    return purpose in bits and purpose not in LEGITIMATE_INTEREST_EXCLUDED_PURPOSES


def parse_tc_string(text: str) -> TCString:
    """Validate ``text`` strictly and decode it; raises :class:`TCStringError` with the reason."""
    if not text:
        raise TCStringError("the TC string is empty")
    if len(text) > MAX_TC_STRING_LENGTH:
        raise TCStringError(f"the TC string is longer than {MAX_TC_STRING_LENGTH} characters")
    segments = text.split(".")
    bits = [_segment_bits(number, segment) for number, segment in enumerate(segments, start=1)]

    core_walk = _measure_core(bits[0])
    extra: dict[SegmentType, tuple[str, _Measured]] = {}
    for number, segment_bits in enumerate(bits[1:], start=2):
        segment_type = _segment_type(number, segment_bits)
        if segment_type in extra:
            raise TCStringError(
                f"segment type {segment_type.value} ({_SEGMENT_NAMES[segment_type]}) appears twice"
            )
        extra[segment_type] = (segment_bits, _measure_extra(number, segment_type, segment_bits))

    if core_walk.policy_version < MIN_POLICY_VERSION:
        raise TCStringError(
            f"TCF policy version {core_walk.policy_version} predates TCF 2.2 "
            f"(version {MIN_POLICY_VERSION} or later is required)"
        )
    return _decode(text, bits[0], extra)


# Syntax ---------------------------------------------------------------------------------------


def _segment_bits(number: int, segment: str) -> str:
    if not segment:
        raise TCStringError(f"segment {number} is empty")
    if not _SEGMENT.fullmatch(segment):
        raise TCStringError(
            f"segment {number} is not base64url without padding "
            "(only A-Z, a-z, 0-9, '-' and '_' are allowed)"
        )
    return "".join(_SEXTETS[char] for char in segment)


def _segment_type(number: int, bits: str) -> SegmentType:
    value = int(bits[:3], 2)  # a valid segment holds at least one 6-bit character
    if value == SegmentType.CORE:
        raise TCStringError(
            f"segment {number} is a core segment; the core segment must come first, once"
        )
    try:
        return SegmentType(value)
    except ValueError:
        raise TCStringError(f"segment {number} has unknown segment type {value}") from None


# Measuring ------------------------------------------------------------------------------------


class _Reader:
    """Reads fixed-width unsigned fields from a segment's bits, counting every bit the fields
    declare, whether or not the segment holds them."""

    def __init__(self, bits: str, name: str) -> None:
        self.bits = bits
        self.name = name
        self.position = 0

    def read(self, width: int, field: str) -> int:
        end = self.position + width
        if end > len(self.bits):
            raise TCStringError(
                f"{self.name} is {len(self.bits)} bits but its fields need at least {end} "
                f"(it ends inside {field})"
            )
        value = int(self.bits[self.position : end], 2)
        self.position = end
        return value

    def skip(self, width: int) -> int:
        start = self.position
        self.position += width
        return start

    def letters(self, field: str) -> None:
        for index in (1, 2):
            letter = self.read(6, field)
            if letter > 25:
                raise TCStringError(
                    f"{self.name}: letter {index} of {field} is {letter}, not A to Z (0 to 25)"
                )

    def finish(self) -> None:
        length, needed = len(self.bits), self.position
        if needed > length:
            raise TCStringError(f"{self.name} is {length} bits but its fields need {needed}")
        if length - needed > MAX_PADDING_BITS:
            raise TCStringError(
                f"{self.name} is {length} bits but its fields need {needed} "
                f"(at most {MAX_PADDING_BITS} bits of padding are allowed)"
            )
        if "1" in self.bits[needed:]:
            raise TCStringError(f"{self.name} has non-zero padding after bit {needed}")


@dataclass(frozen=True, slots=True)
class _VendorSection:
    """Where a vendor set lies: a bit field starting at ``bitfield_start``, or ranges."""

    max_vendor_id: int
    bitfield_start: int | None
    ranges: tuple[tuple[int, int], ...]

    def vendor_ids(self, bits: str) -> frozenset[int]:
        if self.bitfield_start is None:
            return _expand(self.ranges)
        field = bits[self.bitfield_start : self.bitfield_start + self.max_vendor_id]
        return frozenset(index for index, bit in enumerate(field, start=1) if bit == "1")


@dataclass(frozen=True, slots=True)
class _Measured:
    """What measuring a segment learnt that decoding needs."""

    policy_version: int = 0
    vendors: _VendorSection | None = None


def _measure_core(bits: str) -> _Measured:
    reader = _Reader(bits, "core segment")
    version = reader.read(6, "Version")
    if version != TCF_VERSION:
        leading = version >> 3
        if leading in (1, 2, 3):
            raise TCStringError(
                f"segment 1 is a {_SEGMENT_NAMES[SegmentType(leading)]} segment; "
                "the core segment must come first"
            )
        raise TCStringError(f"core segment version is {version}, expected {TCF_VERSION}")
    reader.skip(_CREATED_TO_SCREEN_BITS)
    reader.letters("ConsentLanguage")
    reader.skip(12)  # VendorListVersion
    policy_version = reader.read(6, "TcfPolicyVersion")
    reader.skip(_SERVICE_TO_P1T_BITS)
    reader.letters("PublisherCC")
    _read_vendor_section(reader, "vendor consent section")
    _read_vendor_section(reader, "vendor legitimate interest section")
    _read_publisher_restrictions(reader)
    reader.finish()
    return _Measured(policy_version=policy_version)


def _measure_extra(number: int, segment_type: SegmentType, bits: str) -> _Measured:
    reader = _Reader(bits, f"segment {number} ({_SEGMENT_NAMES[segment_type]})")
    reader.skip(3)  # SegmentType
    vendors = None
    if segment_type == SegmentType.PUBLISHER_TC:
        reader.skip(24 + 24)  # PubPurposesConsent, PubPurposesLITransparency
        custom = reader.read(6, "NumCustomPurposes")
        reader.skip(2 * custom)  # CustomPurposesConsent, CustomPurposesLITransparency
    else:
        vendors = _read_vendor_section(reader, "vendor section")
    reader.finish()
    return _Measured(vendors=vendors)


def _read_vendor_section(reader: _Reader, section: str) -> _VendorSection:
    max_vendor_id = reader.read(16, f"the {section}'s MaxVendorId")
    if not reader.read(1, f"the {section}'s IsRangeEncoding"):
        return _VendorSection(max_vendor_id, reader.skip(max_vendor_id), ())
    entries = reader.read(12, f"the {section}'s NumEntries")
    ranges = _read_ranges(reader, entries, section)
    if ranges and ranges[-1][1] > max_vendor_id:
        raise TCStringError(
            f"{reader.name}: the {section} names vendor {ranges[-1][1]}, "
            f"beyond its MaxVendorId {max_vendor_id}"
        )
    return _VendorSection(max_vendor_id, None, ranges)


def _read_ranges(reader: _Reader, entries: int, section: str) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for index in range(1, entries + 1):
        field = f"range entry {index} of the {section}"
        is_range = reader.read(1, field)
        start = reader.read(16, field)
        end = reader.read(16, field) if is_range else start
        if start == 0:
            raise TCStringError(f"{reader.name}: {field} names vendor 0 (vendor ids start at 1)")
        if end < start:
            raise TCStringError(f"{reader.name}: {field} ends ({end}) before it starts ({start})")
        if ranges:
            previous_start, previous_end = ranges[-1]
            if start <= previous_start:
                raise TCStringError(
                    f"{reader.name}: vendor range entries are out of order in the {section} "
                    f"(entry {index} starts at {start}, after {previous_start})"
                )
            if start <= previous_end:
                raise TCStringError(
                    f"{reader.name}: vendor range entries overlap in the {section} "
                    f"(entry {index} starts at {start}, inside {previous_start}-{previous_end})"
                )
        ranges.append((start, end))
    return tuple(ranges)


def _read_publisher_restrictions(reader: _Reader) -> None:
    count = reader.read(12, "NumPubRestrictions")
    for index in range(1, count + 1):
        what = f"publisher restriction {index}"
        purpose = reader.read(6, what)
        restriction = reader.read(2, what)
        if not 1 <= purpose <= MAX_PURPOSE_ID:
            raise TCStringError(f"{reader.name}: {what} names purpose {purpose}")
        if restriction not in tuple(RestrictionType):
            raise TCStringError(
                f"{reader.name}: {what} has restriction type {restriction}, which is undefined"
            )
        entries = reader.read(12, f"the NumEntries of {what}")
        _read_ranges(reader, entries, what)


# Decoding -------------------------------------------------------------------------------------


def _decode(
    text: str, core_bits: str, extra: Mapping[SegmentType, tuple[str, _Measured]]
) -> TCString:
    decoded = iab_tcf.ConsentV2(_bytes(core_bits))
    disclosed_vendors = None
    segment_bits, measured = extra.get(SegmentType.DISCLOSED_VENDORS, ("", _Measured()))
    if measured.vendors is not None:
        # iab-tcf expands non-core range entries by re-copying a dict per entry (quadratic in
        # the number of vendors), so the measured ranges are expanded here instead.
        disclosed_vendors = measured.vendors.vendor_ids(segment_bits)
    publisher_tc = None
    if SegmentType.PUBLISHER_TC in extra:
        segment_bits, _ = extra[SegmentType.PUBLISHER_TC]
        entry = NonCoreSegment(_bytes(segment_bits)).read_publisher_tc()
        publisher_tc = PublisherTC(
            purpose_consents=_set_bits(entry.purposes_consent),
            purpose_legitimate_interests=_set_bits(entry.purposes_lit_transparency),
            custom_purpose_consents=_set_bits(entry.custom_purposes_consent),
            custom_purpose_legitimate_interests=_set_bits(entry.custom_purposes_lit_transparency),
        )
    return TCString(
        text=text,
        version=int(decoded.version),
        created=_utc(decoded.created),
        last_updated=_utc(decoded.last_updated),
        cmp_id=int(decoded.cmp_id),
        cmp_version=int(decoded.cmp_version),
        consent_screen=int(decoded.consent_screen),
        consent_language=bytes(decoded.consent_language).decode("ascii"),
        vendor_list_version=int(decoded.vendor_list_version),
        policy_version=int(decoded.tcf_policy_version),
        is_service_specific=bool(decoded.is_service_specific),
        use_non_standard_texts=bool(decoded.use_non_standard_stacks),
        special_feature_opt_ins=_set_bits(decoded.special_features_optin),
        purpose_consents=_set_bits(decoded.purposes_consent),
        purpose_legitimate_interests=_set_bits(decoded.purposes_legitimate_interests),
        purpose_one_treatment=bool(decoded.purpose_one_treatment),
        publisher_cc=bytes(decoded.publisher_cc).decode("ascii"),
        vendor_consents=_vendors(
            decoded.is_consent_range_encoding,
            getattr(decoded, "consented_vendors_range", ()),
            getattr(decoded, "consented_vendors", {}),
        ),
        vendor_legitimate_interests=_vendors(
            decoded.is_interests_range_encoding,
            getattr(decoded, "interests_vendors_range", ()),
            getattr(decoded, "interests_vendors", {}),
        ),
        publisher_restrictions=tuple(
            PublisherRestriction(
                purpose=int(entry.purpose_id),
                restriction=RestrictionType(int(entry.restriction_type)),
                vendor_ranges=tuple(
                    (int(start), int(end)) for start, end in entry.restrictions_range
                ),
            )
            for entry in decoded.pub_restriction_entries
        ),
        disclosed_vendors=disclosed_vendors,
        publisher_tc=publisher_tc,
    )


def _bytes(bits: str) -> bytes:
    padded = bits + "0" * (-len(bits) % 8)
    return int(padded, 2).to_bytes(len(padded) // 8, "big")


def _set_bits(field: Mapping[int, Any]) -> frozenset[int]:
    return frozenset(int(index) for index, value in field.items() if value)


def _expand(ranges: Iterable[tuple[int, int]]) -> frozenset[int]:
    ids: set[int] = set()
    for start, end in ranges:
        ids.update(range(int(start), int(end) + 1))
    return frozenset(ids)


def _vendors(
    is_range: Any, ranges: Iterable[tuple[int, int]], bitfield: Mapping[int, Any]
) -> frozenset[int]:
    return _expand(ranges) if is_range else _set_bits(bitfield)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)
