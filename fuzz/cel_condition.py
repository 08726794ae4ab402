"""Fuzz target: CEL tag conditions through the checker and compiler (services/tagging/compiler.py).

Documented outcome: ConditionError naming the construct at fault, or a compiled condition whose
three evaluators agree on sample profiles: the per-profile closure, the numpy batch evaluator
and cel-python's interpreter on the checked expression (the reference). None of them may raise:
errors inside a condition (division by zero, int overflow) make it false.
"""

from __future__ import annotations

import sys

from services.tagging.compiler import CompiledCondition, ConditionError, compile_condition
from services.tagging.profile import ProfileColumns, profile_dict

PROFILES = [
    profile_dict({}),
    profile_dict(
        {
            "spend_90d": 620.5,
            "spend_30d": 0.0,
            "orders_90d": 3,
            "orders_30d": 0,
            "events_7d": 9,
            "events_30d": -4,
            "lifecycle": "active",
            "category_affinity": {"outdoor": 0.7, "kitchen": 0.0},
            "type_counts_30d": {"purchase": 9223372036854775807},
        }
    ),
]
COLUMNS = ProfileColumns.from_profiles(PROFILES)

SEEDS = [
    text.encode()
    for text in (
        "p.spend_90d >= 500.0 && p.orders_90d >= 2",
        'p.category_affinity["outdoor"] > 0.6 || "kitchen" in p.category_affinity',
        'p.lifecycle in ["new", "active"] && !has(p.category_views.kitchen)',
        "(p.orders_90d > 3 ? p.spend_90d : p.orders_90d * 10) >= 100",
        "int(p.spend_90d / 3.0) % 7 == 2 || size(p.type_counts_30d) > 1",
        "p.orders_90d / 0 > 1 || p.events_30d + 9223372036854775800 > 0",
        "double(p.orders_90d) / 4.0 > 1.5 && -p.events_7d < 2",
        'p.type_counts_30d.purchase * 2 > 1 && p.lifecycle < "b"',
    )
]


def check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        condition = compile_condition(text)
    except ConditionError as error:
        assert error.message, "a refusal names the construct"
        return
    assert isinstance(condition, CompiledCondition)
    batch = condition.evaluate_batch(COLUMNS)
    for row, profile in enumerate(PROFILES):
        single = condition.evaluate(profile)
        assert isinstance(single, bool)
        assert bool(batch[row]) == single, f"batch and closure disagree on {text!r}, row {row}"
        try:
            reference = condition.interpret(profile)
        except RecursionError:
            continue  # cel-python needs ~15 frames a level; the compiled paths need far fewer
        assert reference == single, f"cel-python says {reference} for {text!r}, row {row}"


if __name__ == "__main__":
    from _harness import main

    main(__file__, ("services", "lark", "celpy"))
    sys.exit(0)
