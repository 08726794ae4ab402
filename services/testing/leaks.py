"""Looking for what must not be anywhere: raw identifiers and erased persons' ids in every row of
every table, every log line and every exported span.

One scanner for the suite's leak checks (``tests/integration/test_cascades.py``,
``tests/reliability/test_soak.py``, ``bench/soak.py``). It is case-insensitive and knows the
forms an identifier takes on its way through the suite: as sent (``Shopper7@Example.org``,
``+44 20 7946 0123``), normalised (``shopper7@example.org``, ``+442079460123``) and, for a phone,
any spelling of the same digits (``020 7946 0123``). Values of a recognisable shape (e-mail
addresses, UUIDs, Steward person ids, phone digits) are found by one regular expression per
shape and looked up in a set, so a scan of hundreds of megabytes for thousands of values costs
seconds; anything else is searched for as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Final, cast

import phonenumbers
from sqlalchemy import LargeBinary, MetaData, select
from steward.common.v1 import common_pb2

from services.common.db import make_engine
from services.common.identifiers import IdentifierError, IdentifierType, normalise

_EMAIL: Final = re.compile(r"[a-z0-9._%+-]+@[a-z0-9.-]*[a-z0-9]")
_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PERSON_ID: Final = re.compile(r"p_[0-9a-f]{32}")
_DIGITS: Final = re.compile(r"(?<![0-9a-z])\+?\d[\d\s().-]*\d")
"""A run of digits and the separators people write numbers with that does not continue a word
(the digits inside a hex digest are not a phone number). Nothing is required after it: in an
exported span a protobuf tag byte, often a letter or digit, follows the value."""

_SHAPES: Final = (_UUID, _PERSON_ID)
_CHUNK_CHARACTERS: Final = 1 << 20
_ROW_SEPARATOR: Final = "\x00"


@dataclass
class Needles:
    """What to look for. ``found_in(text)`` names each needle the text contains."""

    phone_region: str = "GB"
    _emails: set[str] = field(default_factory=set)
    _shaped: dict[re.Pattern[str], set[str]] = field(default_factory=dict)
    _phone_digits: dict[str, str] = field(default_factory=dict)
    """National significant number -> the phone as sent."""
    _literals: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, values: Iterable[str]) -> Needles:
        """Plain values (person ids, digests): found wherever they occur, in any case."""
        needles = cls()
        for value in values:
            needles.add(value)
        return needles

    def add(self, value: str) -> None:
        lowered = value.strip().lower()
        if not lowered:
            return
        if _EMAIL.fullmatch(lowered):
            self._emails.add(lowered)
            return
        for shape in _SHAPES:
            if shape.fullmatch(lowered):
                self._shaped.setdefault(shape, set()).add(lowered)
                return
        self._literals.add(lowered)

    def add_identifier(self, identifier_type: int, value: str) -> None:
        """A raw identifier in the form sent, normalised and, for a phone, in any spelling of
        its digits."""
        if identifier_type == common_pb2.IDENTIFIER_TYPE_PHONE:
            with suppress(phonenumbers.NumberParseException):
                parsed = phonenumbers.parse(value, self.phone_region)
                self._phone_digits[str(parsed.national_number)] = value
                return
        self.add(value)
        with suppress(IdentifierError):
            kind = cast(IdentifierType, identifier_type)
            self.add(normalise(kind, value, phone_region=self.phone_region))

    def __len__(self) -> int:
        return (
            len(self._emails)
            + sum(len(values) for values in self._shaped.values())
            + len(self._phone_digits)
            + len(self._literals)
        )

    def _emails_within(self, candidate: str) -> set[str]:
        """The needles inside an e-mail-shaped run: "x.shopper7@example.org" holds
        shopper7@example.org, and so does "shopper7@example.orgb" (a protobuf tag byte after
        the value)."""
        at = candidate.index("@")
        return {
            candidate[start:end]
            for start in range(at)
            for end in range(at + 2, len(candidate) + 1)
            if candidate[start:end] in self._emails
        }

    def found_in(self, text: str) -> set[str]:
        """The needles ``text`` contains (lower-cased; a phone as it was sent)."""
        lowered = text.lower()
        found: set[str] = set()
        if self._emails and "@" in lowered:
            for match in _EMAIL.finditer(lowered):
                found.update(self._emails_within(match.group()))
        for shape, values in self._shaped.items():
            found.update(m.group() for m in shape.finditer(lowered) if m.group() in values)
        if self._phone_digits:
            lengths = {len(number) for number in self._phone_digits}
            for match in _DIGITS.finditer(lowered):
                digits = re.sub(r"\D", "", match.group())
                for length in lengths:
                    for start in range(len(digits) - length + 1):
                        phone = self._phone_digits.get(digits[start : start + length])
                        if phone is not None:
                            found.add(phone)
        found.update(literal for literal in self._literals if literal in lowered)
        return found


def table_texts(url: str) -> Iterator[tuple[str, str]]:
    """(table, text) for every table of the database at ``url``: its rows as text (binary
    columns decoded byte for byte, JSON as JSON), in chunks of about a million characters."""
    engine = make_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                binary = [isinstance(column.type, LargeBinary) for column in table.columns]
                parts: list[str] = []
                size = 0
                rows = connection.execution_options(stream_results=True, yield_per=2000)
                for row in rows.execute(select(table)):
                    for value, is_binary in zip(row, binary, strict=True):
                        text = _as_text(value, is_binary)
                        parts.append(text)
                        size += len(text) + 1
                    if size >= _CHUNK_CHARACTERS:
                        yield table.name, _ROW_SEPARATOR.join(parts)
                        parts, size = [], 0
                if parts:
                    yield table.name, _ROW_SEPARATOR.join(parts)
    finally:
        engine.dispose()


def _as_text(value: object, binary: bool) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict | list):
        return json.dumps(value)
    return "" if value is None else str(value)


def rows_naming(databases: Mapping[str, str], needles: Needles) -> dict[tuple[str, str], set[str]]:
    """What each (database, table) of ``databases`` (name -> URL) holds of ``needles``; only
    tables holding some are listed. Services sharing one database (PostgreSQL) are read once,
    under their names joined by ``+``."""
    names_by_url: dict[str, list[str]] = {}
    for name, url in databases.items():
        names_by_url.setdefault(url, []).append(name)
    found: dict[tuple[str, str], set[str]] = {}
    for url, names in names_by_url.items():
        for table, text in table_texts(url):
            hits = needles.found_in(text)
            if hits:
                found.setdefault(("+".join(names), table), set()).update(hits)
    return found
