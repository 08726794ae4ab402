"""Rule sets: the example parses, every problem is reported at its place, sensitive inferences are
refused."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.tagging.rules import (
    DEFAULT_K_FLOOR,
    DEFAULT_TAG_BUDGET,
    ParsedRuleSet,
    RuleSetError,
    format_duration,
    parse_duration,
    parse_rule_set,
    rule_problems,
)
from services.tagging.sensitive import BUILTIN_CATEGORIES, screen, sensitive_screen

EXAMPLE = Path(__file__).resolve().parents[2] / "rules" / "example.yaml"


def _tag(
    tag_id: str = "big_spender",
    category: str = "value",
    description: str = "Spent a lot lately.",
    condition: str = "p.spend_90d >= 500.0",
    extra: str = "",
) -> str:
    return (
        f"  - id: {tag_id}\n"
        f"    category: {category}\n"
        f"    description: {description}\n"
        f"    condition: '{condition}'\n"
        f"{extra}"
    )


def _rule_set(*tags: str, head: str = "") -> str:
    return head + "tags:\n" + "".join(tags)


def _problems(text: str, **kwargs: object) -> dict[str, list[str]]:
    with pytest.raises(RuleSetError) as caught:
        parse_rule_set(text, **kwargs)  # type: ignore[arg-type]
    problems: dict[str, list[str]] = {}
    for path, description in caught.value.problems:
        problems.setdefault(path, []).append(description)
    return problems


def test_example_rule_set_parses_and_compiles() -> None:
    parsed = parse_rule_set(EXAMPLE.read_text())
    ids = [rule.id for rule in parsed.rules]
    assert {"champion", "big_spender", "loyal_regular", "at_risk_valued", "churned"} <= set(ids)
    assert {"new_customer", "outdoor_enthusiast", "kitchen_lover", "weekend_shopper"} <= set(ids)
    assert "hesitant_buyer" in ids
    assert parsed.tag_budget == 5 and parsed.k_floor == 50
    champion = parsed.rule("champion")
    assert champion is not None
    assert champion.fields_read == ("rfm_recency", "rfm_frequency", "rfm_monetary")
    assert champion.ttl == timedelta(days=30) and champion.priority == 100
    hesitant = parsed.rule("hesitant_buyer")
    assert hesitant is not None and hesitant.purpose == "marketing"
    assert all(rule.condition.checked_text for rule in parsed.rules)
    churned = parsed.rule("churned")
    assert churned is not None
    assert (churned.evidence_window, churned.min_evidence) == ("lifetime", 3)


def test_defaults_apply() -> None:
    parsed = parse_rule_set(_rule_set(_tag()))
    rule = parsed.rules[0]
    assert (rule.purpose, rule.min_evidence, rule.ttl, rule.priority) == (
        "profiling",
        1,
        timedelta(days=30),
        0,
    )
    assert rule.evidence_window == "90d"
    assert parsed.tag_budget == DEFAULT_TAG_BUDGET and parsed.k_floor == DEFAULT_K_FLOOR
    assert parsed.version == 0 and parsed.with_version(3).version == 3
    assert isinstance(parsed, ParsedRuleSet)


@pytest.mark.parametrize("window", ["7d", "30d", "90d", "lifetime"])
def test_evidence_windows(window: str) -> None:
    parsed = parse_rule_set(_rule_set(_tag(extra=f"    evidence_window: {window}\n")))
    assert parsed.rules[0].evidence_window == window


@pytest.mark.parametrize("window", ["60d", "forever", "90", "[90d]"])
def test_an_unknown_evidence_window_is_refused(window: str) -> None:
    problems = _problems(_rule_set(_tag(extra=f"    evidence_window: {window}\n")))
    (message,) = problems["tags[0].evidence_window"]
    assert message.startswith("must be one of 7d, 30d, 90d, lifetime")


def test_every_problem_is_reported_at_its_place() -> None:
    text = _rule_set(
        _tag("BigSpender", condition="p.spend_91d > 1"),
        _tag("ok_tag", condition="p.lifecycle == 1", extra="    ttl: 6m\n    priority: high\n"),
        _tag("ok_tag", extra="    min_evidence: 0\n    colour: red\n"),
        head="tag_budget: 0\nk_floor: 3\nunbanned_categories: [health]\n",
    )
    problems = _problems(text)
    assert problems["unbanned_categories"] == [
        "unknown key (expected one of tags, tag_budget, k_floor, banned_categories)"
    ]
    assert problems["tag_budget"] == ["must be between 1 and 50, not 0"]
    assert problems["k_floor"] == ["must be between 10 and 10000000, not 3"]
    assert problems["tags[0].id"] == ["'BigSpender' is not lower snake case of 1 to 64 chars"]
    assert "unknown field p.spend_91d (did you mean spend_90d" in problems["tags[0].condition"][0]
    assert "cannot compare string with int" in problems["tags[1].condition"][0]
    assert problems["tags[1].ttl"] == [
        "'6m' is not a duration: write whole days or hours, e.g. 30d or 12h"
    ]
    assert problems["tags[1].priority"] == ["must be a whole number, not 'high'"]
    assert problems["tags[2].id"] == ["duplicate id 'ok_tag' (first at tags[1])"]
    assert problems["tags[2].min_evidence"] == ["must be between 1 and 1000000, not 0"]
    assert "unknown key" in problems["tags[2].colour"][0]


def test_rule_set_error_is_an_invalid_argument_with_field_violations() -> None:
    parsed, problems = rule_problems("tags: []\nk_floor: 1\n")
    assert parsed is None
    assert problems == (("k_floor", "must be between 10 and 10000000, not 1"),)
    with pytest.raises(InvalidArgument):
        parse_rule_set("tags: [1]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just a list", "the document must be a mapping with a `tags` list"),
        ("tags: [", "at line"),
        ("a: &x [1]\ntags: *x\n", "aliases (*name) are not allowed at line 2"),
        ("tags: []\ntags: []\n", "key 'tags' appears twice at line 2"),
        # found by fuzz/rule_set.py: PyYAML composes recursively, RecursionError escaped
        ("tags: " + "[" * 3000, "nested deeper than 32 levels at line 1"),
        ("tags:\n" + "".join("  " * depth + "- \n" for depth in range(40)), "nested deeper"),
        # found by atheris (fuzz/rule_set.py): a list as a key raised TypeError
        ("[0%vags]: x\ntags: []\n", "found unhashable key at line 1"),
    ],
)
def test_malformed_yaml_is_refused(text: str, message: str) -> None:
    problems = _problems(text)
    assert any(message in description for description in problems.get("yaml", [])), problems


def test_required_fields() -> None:
    problems = _problems("tags:\n  - id: lonely\n")
    assert problems["tags[0].category"] == ["is required"]
    assert problems["tags[0].description"] == ["is required"]
    assert problems["tags[0].condition"] == ["is required"]
    assert _problems("tag_budget: 3\n")["tags"] == ["is required: a list of tags"]


def test_unknown_purpose_is_refused_when_purposes_are_known() -> None:
    text = _rule_set(_tag(extra="    purpose: profilling\n"))
    problems = _problems(text, known_purposes={"profiling", "marketing"})
    assert problems["tags[0].purpose"] == [
        "unknown purpose 'profilling' (known: marketing, profiling)"
    ]
    assert parse_rule_set(text).rules[0].purpose == "profilling"


@pytest.mark.parametrize("category", [c.id for c in BUILTIN_CATEGORIES])
def test_every_builtin_sensitive_category_is_refused(category: str) -> None:
    problems = _problems(_rule_set(_tag(category=category)))
    assert len(problems["tags[0].category"]) == 1
    assert f"'{category}' is the banned category" in problems["tags[0].category"][0]


@pytest.mark.parametrize(
    ("category", "label"),
    [
        ("religion", "religious or philosophical beliefs"),
        ("ethnicity", "racial or ethnic origin"),
        ("sexual_orientation", "sex life or sexual orientation"),
        ("politics", "political opinions"),
        ("medical", "health"),
        ("immigration", "citizenship or immigration status"),
    ],
)
def test_categories_that_reveal_a_banned_one_are_refused(category: str, label: str) -> None:
    problems = _problems(_rule_set(_tag(category=category)))
    assert problems["tags[0].category"] == [
        f"'{category}' reveals the banned category {label} "
        + f"({sensitive_screen().categories[_id(label)].law})"
    ]


def _id(label: str) -> str:
    return next(c.id for c in BUILTIN_CATEGORIES if c.label == label)


@pytest.mark.parametrize(
    ("tag_id", "term", "category"),
    [
        ("pregnant_shoppers", "pregnant", "health"),
        ("likely-diabetic", "diabetic", "health"),
        ("muslim_family", "muslim", "religious or philosophical beliefs"),
        ("lgbt_friendly", "lgbt", "sex life or sexual orientation"),
        ("union_member_discount", "union member", "trade-union membership"),
        ("kids_under_14", "kids", "minors under 14"),
        ("passport_holder", "passport", "government identifiers"),
        ("immigrants", "immigrants", "citizenship or immigration status"),
    ],
)
def test_sensitive_terms_in_ids_are_named(tag_id: str, term: str, category: str) -> None:
    problems = _problems(_rule_set(_tag(tag_id=tag_id)))
    expected = f"the id '{tag_id}' names '{term}', which reveals {category} ("
    assert any(message.startswith(expected) for message in problems["tags[0].id"])


def test_sensitive_terms_in_descriptions_and_condition_keys_are_named() -> None:
    text = _rule_set(
        _tag(
            description="Probably expecting - pregnancy tests and Cancer screening.",
            condition='p.category_affinity["diabetes_care"] > 0.5',
        )
    )
    problems = _problems(text)
    described = problems["tags[0].description"]
    assert [d.split(",")[0] for d in described] == [
        "the description names 'pregnancy'",
        "the description names 'cancer'",
    ]
    assert problems["tags[0].condition"] == [
        "the string 'diabetes_care' names 'diabetes', which reveals health "
        "(GDPR Art. 9, PIPL Art. 28, CPRA): tags must not infer sensitive categories"
    ]


def test_screening_matches_whole_words_only() -> None:
    assert screen("essex_unisex_racecourse") == []
    assert screen("Health-conscious") == [("health", "health")]
    assert screen("Refugees welcome") == [("citizenship_or_immigration_status", "refugee")]
    assert screen("Mental Illness") == [("health", "mental illness")]


def test_operator_may_add_banned_categories() -> None:
    head = "banned_categories:\n  - gambling\n  - id: alcohol\n    terms: [beer, wine]\n"
    problems = _problems(
        _rule_set(
            _tag("beer_lover"),
            _tag("casino_fan", category="gambling"),
            _tag("tobacco_fan", description="Buys tobacco."),
            head=head,
        ),
        extra_banned=["tobacco"],
    )
    assert (
        "names 'beer', which reveals alcohol (banned by the operator)"
        in (problems["tags[0].id"][0])
    )
    assert problems["tags[1].category"] == [
        "'gambling' is the banned category gambling (banned by the operator)"
    ]
    assert "names 'tobacco'" in problems["tags[2].id"][0]
    assert "names 'tobacco'" in problems["tags[2].description"][0]
    parsed = parse_rule_set(_rule_set(_tag(), head=head))
    assert parsed.extra_banned_categories == ("gambling", "alcohol")


def test_operator_cannot_remove_builtin_categories() -> None:
    # Naming a built-in category as an extra only adds terms; its own terms stay banned.
    head = "banned_categories:\n  - id: health\n    terms: [vitamins]\n"
    problems = _problems(
        _rule_set(_tag("vitamin_buyer"), _tag("pregnant_shopper"), _tag("vitamins"), head=head)
    )
    assert "tags[0].id" not in problems
    assert "names 'pregnant'" in problems["tags[1].id"][0]
    assert "names 'vitamins'" in problems["tags[2].id"][0]
    # There is no key to lift a ban.
    problems = _problems(_rule_set(_tag(category="health"), head="allowed_categories: [health]\n"))
    assert "allowed_categories" in problems and "tags[0].category" in problems
    screen_with_extras = sensitive_screen(["health", "gambling"])
    assert {c.id for c in BUILTIN_CATEGORIES} <= set(screen_with_extras.categories)


def test_durations() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert format_duration(timedelta(days=30)) == "30d"
    assert format_duration(timedelta(hours=36)) == "36h"
    for bad in ("P30D", "30", "1.5d", "6m", "-1d", "30 days"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    problems = _problems(_rule_set(_tag(extra="    ttl: 400d\n")))
    assert problems["tags[0].ttl"] == ["must be between 1h and 365d"]
