"""Fuzz target: TC strings through the strict TCF v2.2 parser (services/consent/tcf.py).

Half the inputs are taken as text, half as raw segment bits (split on NUL, each base64url
encoded), so the fuzzer mutates the bit fields the parser measures and not only the characters.
Documented outcome: a :class:`TCString` satisfying the format's invariants, or TCStringError.
"""

from __future__ import annotations

import base64
import sys

from services.consent.tcf import (
    MAX_PURPOSE_ID,
    MIN_POLICY_VERSION,
    TCF_VERSION,
    TCString,
    TCStringError,
    parse_tc_string,
)

SEEDS = [
    b"t" + text.encode()
    for text in (
        "CQNnEPwQNrkMMEsAHBENBYEgAP_gAAAAAAYgF5wAgABALzAAAAA.cDAAAAAAAA",
        "CQNnEPwQNrkMMEsAHBENBYEoAPOAAEPAAAYgF5wBAABAAGAAQAvMADAC4AAA.IAEwAwAAgAFAAS",
        "CQNnEPwQNrkMMEsAHBENBYFoAPOAAEPAAAYgASpJJJJJIAGQAgAEQAKAAwAEJACAARAAoAFA.cEAADCAAAaA.QACD",
        "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
        "CPSG_8APSG_8AAAAAAENAACAAAAAAAAAAAAAAAAAAAAA.QAAA.IAAA",
    )
] + [
    b"b" + base64.urlsafe_b64decode("CQNnEPwQNrkMMEsAHBENBYEoAPOAAEPAAAYgF5wBAABAAGAAQAvMADAC4AAA"),
]


def tc_string_of(data: bytes) -> str:
    mode, body = data[:1], data[1:]
    if mode == b"b":
        segments = body.split(b"\x00")
        return ".".join(base64.urlsafe_b64encode(s).decode().rstrip("=") for s in segments)
    return body.decode("utf-8", "replace")


def check(data: bytes) -> None:
    text = tc_string_of(data)
    try:
        parsed = parse_tc_string(text)
    except TCStringError as error:
        assert error.reason, "a refusal must say why"
        return
    assert isinstance(parsed, TCString)
    assert parsed.text == text
    assert parsed.version == TCF_VERSION
    assert parsed.policy_version >= MIN_POLICY_VERSION
    assert len(parsed.consent_language) == 2 and parsed.consent_language.isupper()
    assert len(parsed.publisher_cc) == 2 and parsed.publisher_cc.isupper()
    for purposes in (parsed.purpose_consents, parsed.purpose_legitimate_interests):
        assert all(1 <= purpose <= MAX_PURPOSE_ID for purpose in purposes)
    for vendors in (parsed.vendor_consents, parsed.vendor_legitimate_interests):
        assert all(vendor >= 1 for vendor in vendors)
    for restriction in parsed.publisher_restrictions:
        assert 1 <= restriction.purpose <= MAX_PURPOSE_ID
        assert all(1 <= start <= end for start, end in restriction.vendor_ranges)
    for purpose in range(1, MAX_PURPOSE_ID + 1):
        parsed.has_purpose_consent(purpose)
        parsed.has_purpose_legitimate_interest(purpose)
    assert parse_tc_string(text) == parsed, "parsing the same string twice must agree"


if __name__ == "__main__":
    from _harness import main

    main(__file__, ("services", "iab_tcf"))
    sys.exit(0)
