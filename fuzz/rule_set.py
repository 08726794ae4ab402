"""Fuzz target: rule-set YAML through validation and compilation (services/tagging/rules.py).

Documented outcome: a :class:`ParsedRuleSet` within the documented limits whose every condition
compiled, or RuleSetError listing each problem with its place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.tagging.profile import profile_dict
from services.tagging.rules import (
    EVIDENCE_WINDOWS,
    MAX_TAG_BUDGET,
    MAX_TAGS,
    MAX_TTL,
    MIN_K_FLOOR,
    MIN_TTL,
    ParsedRuleSet,
    RuleSetError,
    parse_rule_set,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "rules" / "example.yaml"
EMPTY_PROFILE = profile_dict({})
PURPOSES = ("analytics", "personalisation", "profiling", "marketing")

SEEDS = [
    EXAMPLE.read_bytes(),
    b"tags: []\n",
    b"""tag_budget: 3
k_floor: 20
banned_categories: [gambling, {id: alcohol, terms: [beer, wine]}]
tags:
  - id: loyal
    category: value
    description: Ordered at least three times this quarter.
    condition: p.orders_90d >= 3 && p.lifecycle in ["active", "new"]
    min_evidence: 2
    evidence_window: 30d
    ttl: 12h
    priority: 5
  - id: lapsed
    category: lifecycle
    description: Nothing for three months.
    purpose: marketing
    condition: >-
      !(p.events_90d > 0)
    evidence_window: lifetime
""",
    b"tags:\n  - id: x\n    condition: '\"outdoor\" in p.category_affinity'\n",
    b"[0%vags]: x\ntags: []\n",  # found by atheris: a list as a key raised TypeError
]


def check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        parsed = parse_rule_set(text, known_purposes=PURPOSES)
    except RuleSetError as error:
        assert error.problems, "a refusal lists its problems"
        assert all(place and problem for place, problem in error.problems)
        return
    assert isinstance(parsed, ParsedRuleSet)
    assert 1 <= parsed.tag_budget <= MAX_TAG_BUDGET
    assert parsed.k_floor >= MIN_K_FLOOR
    assert len(parsed.rules) <= MAX_TAGS
    assert len({rule.id for rule in parsed.rules}) == len(parsed.rules), "tag ids are unique"
    for rule in parsed.rules:
        assert rule.purpose in PURPOSES
        assert rule.evidence_window in EVIDENCE_WINDOWS
        assert MIN_TTL <= rule.ttl <= MAX_TTL
        assert rule.condition.evaluate(EMPTY_PROFILE) in (True, False)


if __name__ == "__main__":
    from _harness import main

    main(__file__, ("services", "yaml", "lark", "celpy"))
    sys.exit(0)
