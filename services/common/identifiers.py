"""Normalisation and pseudonymisation of personal identifiers, shared by consent and identity.

A raw identifier is normalised by its type, checked against the junk values every system
receives (``null``, ``test@test.com``, all zeros…), then keyed-hashed with the keyring's current
HMAC key as ``kid:hexdigest``. The hashed message is ``TYPE:namespace:value`` so the same string
as two types never collides. The raw value lives only inside these functions' frames: it is
never stored, logged, or put on a span.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, TypeAlias

import phonenumbers
from steward.common.v1 import common_pb2

from services.common.keyring import Keyring

IdentifierType: TypeAlias = common_pb2.IdentifierType.ValueType

MAX_VALUE_LENGTH: Final = 256
MAX_NAMESPACE_LENGTH: Final = 64

_NAMESPACE: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")
_EMAIL: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_DIGEST: Final = re.compile(r"[A-Za-z0-9_-]+:[0-9a-f]{64}")
_GMAIL_DOMAINS: Final = frozenset({"gmail.com", "googlemail.com"})

DEFAULT_BLOCKED_VALUES: Final = frozenset(
    {
        "null",
        "none",
        "nil",
        "undefined",
        "unknown",
        "anonymous",
        "n/a",
        "na",
        "-",
        "test",
        "test@test.com",
        "test@example.com",
        "noemail@noemail.com",
        "no@email.com",
        "email@email.com",
        "00000000-0000-0000-0000-000000000000",
    }
)
"""Normalised values that never identify anybody, refused for every type."""

DEFAULT_BLOCKED_PATTERNS: Final = (
    re.compile(r"0+"),  # all zeros: unset device ids, placeholder card numbers
    re.compile(r"\+?0*1234567890?"),  # keyboard-walk phone numbers
    re.compile(r"(?P<repeated>.)(?P=repeated){7,}"),  # one character repeated: 11111111, xxxxxxxx
)
"""Patterns over normalised values that never identify anybody."""

_ANY_BLOCKED_PATTERN: Final = re.compile(
    "|".join(f"(?:{pattern.pattern})" for pattern in DEFAULT_BLOCKED_PATTERNS)
)
"""All of them in one, as every identifier of every Resolve is checked."""

_CASE_FOLDED: Final = frozenset(
    {
        common_pb2.IDENTIFIER_TYPE_EMAIL,
        common_pb2.IDENTIFIER_TYPE_DEVICE_ID,
        common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD,
    }
)


_IDENTIFIER_TYPES: Final = frozenset(common_pb2.IdentifierType.values()) - {
    common_pb2.IDENTIFIER_TYPE_UNSPECIFIED
}
_TYPE_NAMES: Final = {
    type_: common_pb2.IdentifierType.Name(type_).removeprefix("IDENTIFIER_TYPE_")
    for type_ in _IDENTIFIER_TYPES
}


class IdentifierError(ValueError):
    """An identifier that cannot be used; ``field`` names the offending part."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True, slots=True)
class PseudonymisedIdentifier:
    """An identifier in the only form Steward keeps: its type and keyed hash."""

    type: IdentifierType
    namespace: str
    digest: str
    """``kid:hexdigest`` under the current key (or as the caller sent it, when pre-hashed)."""
    candidates: tuple[str, ...]
    """The digest under every key, newest first, for lookups across key rotation."""
    blocked: bool = False
    """The value is a known junk value (``null``, all zeros…) that must never link anything."""


def type_name(identifier_type: IdentifierType) -> str:
    """``EMAIL`` for IDENTIFIER_TYPE_EMAIL."""
    name = _TYPE_NAMES.get(identifier_type)
    if name is None:
        return common_pb2.IdentifierType.Name(identifier_type).removeprefix("IDENTIFIER_TYPE_")
    return name


def normalise(identifier_type: IdentifierType, value: str, *, phone_region: str = "GB") -> str:
    """The canonical form of a raw value, or IdentifierError.

    Email: trimmed, lower-cased; for gmail.com and googlemail.com the dots and any ``+suffix``
    of the local part are removed and the domain becomes gmail.com (all reach one mailbox).
    Phone: E.164 via phonenumbers, ``phone_region`` for numbers without a country code; invalid
    numbers are refused. Loyalty cards: spaces and dashes removed. Device ids, emails and
    loyalty cards are case-folded; cookie, CRM and custom ids keep their case.
    """
    text = value.strip()
    if not text:
        raise IdentifierError("value", "must not be empty")
    if len(text) > MAX_VALUE_LENGTH:
        raise IdentifierError("value", f"longer than {MAX_VALUE_LENGTH} characters")
    if identifier_type == common_pb2.IDENTIFIER_TYPE_EMAIL:
        return _within_limit(_normalise_email(text))
    if identifier_type == common_pb2.IDENTIFIER_TYPE_PHONE:
        return _normalise_phone(text, phone_region)
    if identifier_type == common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD:
        text = re.sub(r"[\s-]+", "", text)
        if not text:
            # Only separators: hashing "" would link every such card to one person.
            raise IdentifierError("value", "has no characters besides spaces and dashes")
    if identifier_type in _CASE_FOLDED:
        return _within_limit(text.casefold())
    if identifier_type in _IDENTIFIER_TYPES:
        return text
    raise IdentifierError("type", "must be a known identifier type")


def _within_limit(normalised: str) -> str:
    # Case folding can lengthen a value ("ß" becomes "ss"): the canonical form must itself be a
    # valid value, or normalising it again (a stored value, a re-sent one) would refuse it.
    if len(normalised) > MAX_VALUE_LENGTH:
        raise IdentifierError("value", f"longer than {MAX_VALUE_LENGTH} characters once normalised")
    return normalised


def _normalise_email(text: str) -> str:
    lowered = text.casefold()
    if not _EMAIL.fullmatch(lowered):
        raise IdentifierError("value", "is not an e-mail address")
    local, domain = lowered.rsplit("@", 1)
    if domain in _GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        domain = "gmail.com"
        if not local:
            raise IdentifierError("value", "is not an e-mail address")
    return f"{local}@{domain}"


@lru_cache(maxsize=65536)
def _normalise_phone(text: str, region: str) -> str:
    # Parsing is the slowest step of a Resolve batch, and the same numbers recur.
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as error:
        raise IdentifierError("value", "is not a phone number") from error
    if not phonenumbers.is_valid_number(parsed):
        raise IdentifierError("value", "is not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def check_namespace(identifier_type: IdentifierType, namespace: str) -> str:
    """The namespace to hash with: required for CUSTOM, empty for every other type."""
    if identifier_type != common_pb2.IDENTIFIER_TYPE_CUSTOM:
        return ""
    if not namespace:
        raise IdentifierError("namespace", "is required for CUSTOM identifiers")
    if len(namespace) > MAX_NAMESPACE_LENGTH or not _NAMESPACE.fullmatch(namespace):
        raise IdentifierError(
            "namespace", "must be lower-case letters, digits, '_' or '-' (at most 64)"
        )
    return namespace


def is_junk(normalised: str) -> bool:
    """Whether a normalised value is one of the values that never identify anybody."""
    bare = normalised.casefold()
    return bare in DEFAULT_BLOCKED_VALUES or _ANY_BLOCKED_PATTERN.fullmatch(bare) is not None


def hash_message(identifier_type: IdentifierType, namespace: str, normalised: str) -> bytes:
    """The bytes that are keyed-hashed for an identifier."""
    return f"{type_name(identifier_type)}:{namespace}:{normalised}".encode()


def pseudonymise_identifier(
    identifier: common_pb2.Identifier,
    keyring: Keyring,
    *,
    phone_region: str = "GB",
    is_blocked: Callable[[str], bool] = is_junk,
) -> PseudonymisedIdentifier:
    """Normalise and keyed-hash a wire identifier (or check a pre-hashed one).

    Raises IdentifierError for unusable input. Values ``is_blocked`` recognises (by default the
    built-in junk values) are returned with ``blocked=True`` rather than refused, so callers can
    report them as blocked. Pre-hashed values cannot be checked here; identity compares them
    with the digests of its blocked values.
    """
    # Every Collect event passes here: each wire field is read once.
    identifier_type = identifier.type
    if identifier_type not in _IDENTIFIER_TYPES:
        raise IdentifierError("type", "must be a known identifier type")
    namespace = (
        check_namespace(identifier_type, identifier.namespace)
        if identifier_type == common_pb2.IDENTIFIER_TYPE_CUSTOM
        else ""
    )
    if identifier.pseudonymised:
        digest = identifier.value.strip().lower()
        if not _DIGEST.fullmatch(digest):
            raise IdentifierError("value", "a pseudonymised value must be 'kid:<64 hex>'")
        return PseudonymisedIdentifier(identifier_type, namespace, digest, (digest,))
    normalised = normalise(identifier_type, identifier.value, phone_region=phone_region)
    message = hash_message(identifier_type, namespace, normalised)
    candidates = tuple(keyring.candidate_digests(message))
    return PseudonymisedIdentifier(
        identifier_type, namespace, candidates[0], candidates, blocked=is_blocked(normalised)
    )
