"""Recognising raw personal identifiers in free text and attribute names.

Telemetry and logging must never carry a raw email address or phone number, whatever a
developer passes them. Pseudonymisation at the edge is the real protection; this module is the
defence in depth behind it, shared by the span processor and the log filter so both agree on
what counts as an identifier.

Detection is by shape, so it errs on the side of redacting:

- an email is ``local@domain.tld`` with a letters-only top-level label;
- a phone number is a run of at least seven digits, optionally led by ``+`` or ``(`` and broken
  by spaces, hyphens or parentheses. Dotted digits (IP addresses, versions, decimals) and ISO
  dates are not phones, and digits glued to letters (hex ids, UUID parts) are not either. A bare
  count of a million or more does look like a phone, so large numbers belong in structured
  fields rather than in message text.
"""

from __future__ import annotations

import re
from typing import Final

REDACTED: Final = "[redacted]"

EMAIL_PATTERN: Final = re.compile(r"[\w.%+-]+@(?:[\w-]+\.)+[^\W\d_]{2,}")

PHONE_CANDIDATE_PATTERN: Final = re.compile(r"(?<![\w.+-])\+?\(?\d[\d ()-]{5,}\d(?![\w:]|\.\d)")

_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")

MIN_PHONE_DIGITS: Final = 7

IDENTIFIER_KEY_PARTS: Final = (
    "email",
    "phone",
    "msisdn",
    "device_id",
    "cookie_id",
    "crm_id",
    "loyalty_card",
    "identifier_value",
    "raw_identifier",
)


def _is_phone_shaped(candidate: str) -> bool:
    if _ISO_DATE.fullmatch(candidate):
        return False
    return sum(character.isdigit() for character in candidate) >= MIN_PHONE_DIGITS


def _redact_phone(match: re.Match[str]) -> str:
    return REDACTED if _is_phone_shaped(match.group()) else match.group()


def redact_text(text: str) -> str:
    """Replace every email- or phone-shaped substring of ``text`` with ``REDACTED``."""
    without_emails = EMAIL_PATTERN.sub(REDACTED, text)
    return PHONE_CANDIDATE_PATTERN.sub(_redact_phone, without_emails)


def contains_identifier(text: str) -> bool:
    """Whether ``text`` mentions anything shaped like an email address or phone number."""
    return redact_text(text) != text


def is_identifier(text: str) -> bool:
    """Whether ``text`` as a whole (ignoring surrounding blanks) is an email or phone number.

    A value that is nothing but an identifier carries no other information worth keeping,
    so callers drop it outright instead of keeping a placeholder.
    """
    stripped = text.strip()
    if EMAIL_PATTERN.fullmatch(stripped):
        return True
    match = PHONE_CANDIDATE_PATTERN.fullmatch(stripped)
    return match is not None and _is_phone_shaped(stripped)


def names_identifier(key: str) -> bool:
    """Whether an attribute or field name says its value is a raw identifier.

    Separators are normalised so ``user.email``, ``device-id`` and ``identifier.value`` are all
    caught; a hashed variant such as ``email_hash`` is caught too, deliberately, because a name
    is the only thing this check can see.
    """
    normalised = re.sub(r"[.\-\s]", "_", key.lower())
    return any(part in normalised for part in IDENTIFIER_KEY_PARTS)
