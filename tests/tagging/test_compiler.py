"""Conditions: compiled closures, compiled numpy and cel-python's interpreter agree; errors are
precise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tagging.compiler import ConditionError, compile_condition
from services.tagging.profile import (
    PROFILE_FIELDS,
    CelType,
    ProfileColumns,
    profile_dict,
)
from services.tagging.rules import parse_rule_set

EXAMPLE = Path(__file__).resolve().parents[2] / "rules" / "example.yaml"
KEYS = ("outdoor", "kitchen", "garden", "web", "app", "purchase", "add_to_cart", "view")

CONDITIONS = [
    *(rule.condition_text for rule in parse_rule_set(EXAMPLE.read_text()).rules),
    "p.spend_90d >= 500 && p.orders_90d >= 2",
    'p.category_affinity["outdoor"] > 0.6',
    'p.lifecycle == "churned"',
    "p.spend_90d == p.orders_90d || p.orders_90d != 3.0",
    # division: by zero is an error, which && and || absorb from either side
    "p.spend_90d / p.orders_90d > 100",
    "p.spend_90d / p.orders_90d > 10.0 || p.orders_90d == 0",
    "p.orders_90d == 0 || p.spend_90d / p.orders_90d > 10.0",
    "(p.spend_90d / p.orders_90d > 10.0) && false",
    "!(p.spend_30d / p.spend_90d >= 0.5) && p.orders_30d > 0",
    "p.orders_90d / p.events_7d == 2 || p.events_7d % 3 == 1",
    "p.events_30d / -3 < p.events_7d % -4",
    "p.events_30d / 4 < 0 || p.events_7d % 4 < 0",
    "p.orders_90d / 0 > 1 || true",
    # maps: absent keys read 0, zero values are absent for in / has / size
    '"outdoor" in p.category_affinity && !has(p.category_views.kitchen)',
    "size(p.category_affinity) >= 2 || p.type_counts_30d.size() == 0",
    'p.category_affinity.outdoor > p.category_affinity["kitchen"]',
    'p.channel_spend_90d["web"] * 2 > p.channel_spend_90d["app"] + 1',
    'p.type_counts_30d["purchase"] - p.type_counts_7d["purchase"] >= 1',
    # lists, ternaries, conversions, strings
    'p.lifecycle in ["new", "active"] && p.orders_90d in [1, 2.0, 3]',
    "(p.orders_90d > 3 ? p.spend_90d : p.orders_90d * 10) >= 100",
    '(p.events_7d > 0 ? p.lifecycle : "none") != "none"',
    "-p.orders_90d + 5 > p.events_7d - 2 * p.events_30d",
    "int(p.spend_90d / 3.0) % 7 == 2",
    "double(p.orders_90d) / 4.0 > 1.5",
    'p.lifecycle < "b" || p.lifecycle >= "n"',
    "(p.rfm_recency == 5) != false",
    # int64 overflow is an error
    "p.orders_90d * 4611686018427387904 > 0",
    "-(p.events_7d - 9223372036854775807) < 0 || p.events_7d < 0",
    "p.events_30d + 9223372036854775800 > 0",
    "int(p.spend_90d * 1e17) > 0",
]

_INTS = st.one_of(st.integers(-5, 12), st.integers(-(10**6), 10**6))
_DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 100.0, 500.0]),
    st.floats(-2000.0, 2000.0, allow_nan=False, allow_infinity=False),
)


def _field_strategy(cel_type: CelType) -> st.SearchStrategy[Any]:
    if cel_type is CelType.INT:
        return _INTS
    if cel_type is CelType.DOUBLE:
        return _DOUBLES
    if cel_type is CelType.STRING:
        return st.sampled_from(["", "new", "active", "at_risk", "churned", "zebra"])
    values = _INTS if cel_type is CelType.MAP_INT else _DOUBLES
    return st.dictionaries(st.sampled_from(KEYS), values, max_size=4)


PROFILES = st.fixed_dictionaries(
    {},
    optional={name: _field_strategy(cel_type) for name, cel_type in PROFILE_FIELDS.items()},
).map(profile_dict)


COMPILED = [compile_condition(text) for text in CONDITIONS]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles=st.lists(PROFILES, min_size=1, max_size=4))
def test_closure_batch_and_interpreter_agree(profiles: list[dict[str, Any]]) -> None:
    columns = ProfileColumns.from_profiles(profiles)
    for condition in COMPILED:
        batch = condition.evaluate_batch(columns)
        for row, profile in enumerate(profiles):
            expected = condition.interpret(profile)
            assert condition.evaluate(profile) is expected, (condition.checked_text, profile)
            assert bool(batch[row]) is expected, (condition.checked_text, profile)


def test_batch_reads_sparse_maps_like_the_closure() -> None:
    profiles: list[dict[str, Any]] = [
        profile_dict({"category_affinity": {"outdoor": 0.7, "kitchen": 0.0}}),
        {"person_id": "raw", "category_affinity": {"kitchen": 0.2}},
        {},
    ]
    condition = compile_condition(
        '"kitchen" in p.category_affinity || size(p.category_affinity) > 0'
    )
    columns = ProfileColumns.from_profiles(profiles)
    assert columns.map_values("category_affinity", "outdoor").tolist() == [0.7, 0.0, 0.0]
    assert condition.evaluate_batch(columns).tolist() == [True, True, False]
    assert [condition.evaluate(p) for p in profiles] == [True, True, False]


def test_columns_given_as_arrays() -> None:
    columns = ProfileColumns.from_arrays(
        3,
        scalars={"spend_90d": [10.0, 600.0, 800.0], "orders_90d": [1, 2, 1]},
        maps={"category_affinity": {"outdoor": [0.0, 0.9, 0.1]}},
    )
    big = compile_condition("p.spend_90d >= 500 && p.orders_90d >= 2")
    outdoor = compile_condition('size(p.category_affinity) == 1 && p.lifecycle == ""')
    assert big.evaluate_batch(columns).tolist() == [False, True, False]
    assert outdoor.evaluate_batch(columns).tolist() == [False, True, True]


def test_fields_read_and_their_values() -> None:
    condition = compile_condition(
        'p.spend_90d >= 500 && "outdoor" in p.category_affinity && size(p.channel_events_90d) > 1'
        ' && p.category_affinity["outdoor"] > 0.5'
    )
    assert condition.fields_read == (
        "spend_90d",
        'category_affinity["outdoor"]',
        "channel_events_90d",
    )
    profile = profile_dict(
        {
            "spend_90d": 612.5,
            "category_affinity": {"outdoor": 0.75},
            "channel_events_90d": {"web": 3, "app": 0, "store": 2},
        }
    )
    assert condition.read_values(profile) == {
        "spend_90d": 612.5,
        'category_affinity["outdoor"]': 0.75,
        "channel_events_90d": {"web": 3, "store": 2},
    }


def test_int_literal_compares_with_double_field() -> None:
    condition = compile_condition("p.spend_90d >= 500")
    assert condition.checked_text == "(p.spend_90d >= 500.0)"
    assert condition.evaluate(profile_dict({"spend_90d": 500.0}))


def test_int_division_truncates_and_double_division_does_not() -> None:
    profile = profile_dict({"orders_90d": -7, "spend_90d": 7.0})
    assert compile_condition("p.orders_90d / 2 == -3").evaluate(profile)
    assert compile_condition("p.orders_90d % 2 == -1").evaluate(profile)
    assert compile_condition("p.spend_90d / 2 == 3.5").evaluate(profile)


def test_division_by_zero_makes_the_condition_false() -> None:
    nobody = profile_dict({"spend_90d": 250.0})
    average_spend = compile_condition("p.spend_90d / p.orders_90d > 100.0")
    assert not average_spend.evaluate(nobody)
    assert not compile_condition("!(p.spend_90d / p.orders_90d > 100.0)").evaluate(nobody)
    assert compile_condition("p.orders_90d == 0 || p.spend_90d / p.orders_90d > 1.0").evaluate(
        nobody
    )


def test_absent_map_key_reads_zero() -> None:
    empty = profile_dict({})
    assert compile_condition('p.category_affinity["outdoor"] == 0.0').evaluate(empty)
    assert not compile_condition('"outdoor" in p.category_affinity').evaluate(empty)
    assert compile_condition('p.category_affinity["outdoor"] == 0.0').interpret(empty)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "p.spend_91d > 100",
            "unknown field p.spend_91d (did you mean spend_90d, spend_30d or "
            "weekend_spend_90d?) (column 3)",
        ),
        ("p.lifecyle == 'new'", "unknown field p.lifecyle (did you mean lifecycle?) (column 3)"),
        ("p.person_id == 'x'", "unknown field p.person_id"),
        (
            "spend_90d > 1",
            "unknown name 'spend_90d': conditions read the profile as p.<field> "
            "(did you mean p.spend_90d?) (column 1)",
        ),
        (
            'matches(p.lifecycle, "^a")',
            "unsupported function matches(): supported functions are size, has, double, int",
        ),
        ('p.lifecycle.startsWith("a")', "unsupported method .startsWith()"),
        ("p.category_views.exists(k, k == 'x')", "unsupported macro exists()"),
        ("p.lifecycle == 1", "cannot compare string with int using == (column 1)"),
        ('p.spend_90d > "500"', "cannot compare double with string using >"),
        ("p.lifecycle + 1 > 2", "+ needs numbers, not string"),
        ("p.spend_90d % 2 == 0", "% needs two ints"),
        ("p.spend_90d && true", "&& needs bools, not double"),
        (
            "p.category_affinity > 0.5",
            'p.category_affinity is a map: read one key (p.category_affinity["<key>"])',
        ),
        ("p.category_affinity[p.lifecycle] > 0.5", "a map key must be a string literal"),
        (
            'p.type_counts_30d["purchse"] > 1',
            "unknown key 'purchse' of p.type_counts_30d (did you mean purchase?)",
        ),
        ("has(p.spend_90d)", "has() tests a map key by field selection"),
        ("size(p.lifecycle) > 1", "size() takes a map field, not string"),
        ("p.spend_90d", "the condition must be a bool, not double"),
        ("p == 1", "`p` is the whole profile"),
        ("p.orders_90d == 1u", "unsigned int literals (1u) are not supported"),
        ("p.lifecycle == null", "null is not supported"),
        ("{'a': 1}['a'] == 1", "map literals are not supported"),
        ("[1, 2] == [1, 2]", "a list literal may only follow `in`"),
        ("p.lifecycle in ['a', 1]", "cannot test whether string is in a list holding int"),
        ("p.spend_90d >=", "syntax error: the condition ends too early"),
        ("p.spend_90d @ 1", "syntax error: unexpected character '@' (column 13)"),
        ("p.spend_90d > 1 &&\n  p.x < 2", "unknown field p.x (line 2, column 5)"),
        ("", "the condition is empty"),
        ("(" * 400 + "true" + ")" * 400, "nested too deeply"),
    ],
)
def test_compile_errors_name_the_construct(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    assert message in str(caught.value)


def test_catalogue_is_the_profile_message_without_person_id() -> None:
    assert "person_id" not in PROFILE_FIELDS
    assert PROFILE_FIELDS["spend_90d"] is CelType.DOUBLE
    assert PROFILE_FIELDS["orders_90d"] is CelType.INT
    assert PROFILE_FIELDS["rfm_recency"] is CelType.INT
    assert PROFILE_FIELDS["lifecycle"] is CelType.STRING
    assert PROFILE_FIELDS["type_counts_30d"] is CelType.MAP_INT
    assert PROFILE_FIELDS["category_affinity"] is CelType.MAP_DOUBLE
    assert len(PROFILE_FIELDS) == 29
