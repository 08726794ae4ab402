"""Fuzz target: identifier normalisation and pseudonymisation (services/common/identifiers.py).

The first byte picks the identifier type (including UNSPECIFIED and unknown numbers) and whether
the value is sent pre-hashed, the second a phone region, the rest (up to a NUL) is the value and
after it the namespace. Documented outcome: a normalised value (idempotent, within the length
limit, the same digest whichever spelling it came from) or IdentifierError.
"""

from __future__ import annotations

import sys

from steward.common.v1 import common_pb2

from services.common.identifiers import (
    MAX_VALUE_LENGTH,
    IdentifierError,
    is_junk,
    normalise,
    pseudonymise_identifier,
)
from services.common.keyring import Keyring

KEYRING = Keyring.generate()
REGIONS = ("GB", "US", "DE", "FR", "IN", "BR", "JP", "ZZ")
TYPES = (*common_pb2.IdentifierType.values(), 99)

SEEDS = [
    b"\x01\x00 Jane.Doe+shop@GoogleMail.com ",
    b"\x01\x00test@test.com",
    b"\x02\x00+44 20 7946 0958",
    b"\x02\x01(415) 555-2671",
    b"\x02\x02030 901820",
    b"\x03\x00ABCDEF-0123-4567-89ab-cdef01234567",
    "\x03\x00Gerät-ẞ-straße-ﬁ".encode(),
    ("\x06\x00" + "Straße-" * 35).encode(),
    b"\x04\x00cookie-XYZ",
    b"\x05\x00CRM-000123",
    b"\x06\x004111 1111-1111 1111",
    b"\x07\x00member-42\x00loyalty_eu",
    b"\x81\x00k1:" + b"ab" * 32,
]


def identifier_of(data: bytes) -> tuple[common_pb2.Identifier, str]:
    head, body = data[:2].ljust(2, b"\x00"), data[2:]
    value, _, namespace = body.partition(b"\x00")
    identifier = common_pb2.Identifier(
        type=TYPES[(head[0] & 0x7F) % len(TYPES)],  # type: ignore[arg-type]
        value=value.decode("utf-8", "replace"),
        namespace=namespace.decode("utf-8", "replace"),
        pseudonymised=bool(head[0] & 0x80),
    )
    return identifier, REGIONS[head[1] % len(REGIONS)]


def check(data: bytes) -> None:
    identifier, region = identifier_of(data)
    try:
        hashed = pseudonymise_identifier(identifier, KEYRING, phone_region=region)
    except IdentifierError as error:
        assert error.field in {"type", "value", "namespace"}, error.field
        return
    assert hashed.digest == hashed.candidates[0]
    kid, _, digest = hashed.digest.partition(":")
    assert kid and len(digest) == 64, hashed.digest
    if identifier.pseudonymised:
        return
    normalised = normalise(identifier.type, identifier.value, phone_region=region)
    assert 0 < len(normalised) <= MAX_VALUE_LENGTH, "the canonical form is within the limit"
    assert normalised == normalised.strip(), "the canonical form is trimmed"
    again = normalise(identifier.type, normalised, phone_region=region)
    assert again == normalised, f"normalising is idempotent: {normalised!r} became {again!r}"
    respelled = common_pb2.Identifier()
    respelled.CopyFrom(identifier)
    respelled.value = normalised
    rehashed = pseudonymise_identifier(respelled, KEYRING, phone_region=region)
    assert rehashed.digest == hashed.digest, "the canonical spelling hashes the same"
    assert rehashed.blocked == hashed.blocked == is_junk(normalised)


if __name__ == "__main__":
    from _harness import main

    main(__file__, ("services", "phonenumbers"))
    sys.exit(0)
