"""Normalisation refuses what it cannot make a usable canonical form of (fuzz findings)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from steward.common.v1 import common_pb2

from services.common.identifiers import MAX_VALUE_LENGTH, IdentifierError, normalise

CASE_FOLDED = [
    common_pb2.IDENTIFIER_TYPE_EMAIL,
    common_pb2.IDENTIFIER_TYPE_DEVICE_ID,
    common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD,
]


@pytest.mark.parametrize("value", ["-", " - - ", "--\t--"])
def test_a_loyalty_card_of_only_separators_is_refused(value: str) -> None:
    # It used to normalise to "", so every such card hashed alike and linked to one person.
    with pytest.raises(IdentifierError, match="besides spaces and dashes"):
        normalise(common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD, value)


def test_a_value_that_case_folding_lengthens_past_the_limit_is_refused() -> None:
    value = "Straße-" * 36  # 252 characters; folded, "ß" becomes "ss": 288
    assert len(value) <= MAX_VALUE_LENGTH
    with pytest.raises(IdentifierError, match="once normalised"):
        normalise(common_pb2.IDENTIFIER_TYPE_DEVICE_ID, value)
    with pytest.raises(IdentifierError, match="once normalised"):
        normalise(common_pb2.IDENTIFIER_TYPE_EMAIL, "ß" * 200 + "@example.de")


@given(
    identifier_type=st.sampled_from(CASE_FOLDED),
    value=st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_VALUE_LENGTH),
)
def test_normalising_a_canonical_form_gives_it_back(identifier_type: int, value: str) -> None:
    try:
        normalised = normalise(identifier_type, value)  # type: ignore[arg-type]
    except IdentifierError:
        return
    assert 0 < len(normalised) <= MAX_VALUE_LENGTH
    assert normalise(identifier_type, normalised) == normalised  # type: ignore[arg-type]
