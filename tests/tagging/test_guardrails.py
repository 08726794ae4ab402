"""Guardrails, one by one: budget, consent, objections, evidence, TTL, k floor, dry run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tagging.guardrails import (
    NO_OBJECTIONS,
    AssignedTag,
    ChangeKind,
    Objections,
    SuppressedTag,
    TagChange,
    TagDecision,
    assign_tags,
    audience_size_report,
    dry_run,
    evaluate_population,
    remove_tags,
)
from services.tagging.profile import ProfileColumns, profile_dict
from services.tagging.rules import ParsedRuleSet, parse_rule_set

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ALL_PURPOSES = frozenset({"profiling", "marketing"})

RULES = parse_rule_set(
    """
tag_budget: 2
k_floor: 10
tags:
  - id: big_spender
    category: value
    description: Spent over 100 lately.
    condition: p.spend_90d >= 100
    ttl: 30d
    priority: 10
  - id: frequent
    category: value
    description: Ordered at least twice.
    condition: p.orders_90d >= 2
    ttl: 10d
    priority: 5
  - id: busy
    category: habit
    description: Many visits.
    condition: p.events_90d >= 3
    ttl: 10d
    priority: 5
  - id: cart_filler
    category: engagement
    description: Fills carts.
    purpose: marketing
    condition: p.cart_additions_30d >= 1
    ttl: 7d
    priority: 1
  - id: well_evidenced
    category: habit
    description: Needs lots of evidence.
    condition: p.events_90d >= 1
    min_evidence: 5
    ttl: 10d
    priority: 0
"""
).with_version(7)

EVERYTHING = profile_dict(
    {"spend_90d": 250.0, "orders_90d": 3, "events_90d": 9, "cart_additions_30d": 2}
)


def _decide(
    profile: dict[str, Any] = EVERYTHING,
    *,
    evidence: int | dict[str, int] = 5,
    purposes: frozenset[str] = ALL_PURPOSES,
    objections: Objections = NO_OBJECTIONS,
    current: dict[str, AssignedTag] | None = None,
    now: datetime = NOW,
    latest_evidence_at: datetime | None = NOW,
    budget: int | None = None,
    rules: ParsedRuleSet = RULES,
) -> TagDecision:
    counts = evidence if isinstance(evidence, dict) else {r.id: evidence for r in rules.rules}
    return assign_tags(
        rules,
        profile,
        evidence_counts=counts,
        consented_purposes=purposes,
        objections=objections,
        current=current or {},
        now=now,
        latest_evidence_at=latest_evidence_at,
        budget=budget,
    )


def _carried(decision: TagDecision) -> dict[str, AssignedTag]:
    return {tag.tag_id: tag for tag in decision.tags}


def _ids(decision: TagDecision) -> list[str]:
    return [tag.tag_id for tag in decision.tags]


def test_budget_keeps_highest_priority_then_stronger_evidence_and_shows_the_rest() -> None:
    evidence = {"big_spender": 4, "frequent": 3, "busy": 7, "cart_filler": 9, "well_evidenced": 9}
    decision = _decide(evidence=evidence)
    assert _ids(decision) == ["big_spender", "busy"]
    assert decision.suppressed == (
        SuppressedTag("frequent", 5, 3, "budget"),
        SuppressedTag("cart_filler", 1, 9, "budget"),
        SuppressedTag("well_evidenced", 0, 9, "budget"),
    )
    assert decision.changed(ChangeKind.ASSIGNED) == ["big_spender", "busy"]
    assert decision.changed(ChangeKind.SUPPRESSED) == ["frequent", "cart_filler", "well_evidenced"]
    assert all(c.reason == "budget" for c in decision.changes if c.kind is ChangeKind.SUPPRESSED)


def test_budget_ties_on_priority_and_evidence_go_to_the_tag_id() -> None:
    decision = _decide(evidence=5, budget=2)
    assert _ids(decision) == ["big_spender", "busy"]
    assert decision.suppressed[0].tag_id == "frequent"


def test_a_carried_tag_pushed_out_by_the_budget_is_removed() -> None:
    first = _decide(budget=5)
    assert len(first.tags) == 5
    second = _decide(budget=2, current=_carried(first), latest_evidence_at=NOW + DAY, now=NOW + DAY)
    assert _ids(second) == ["big_spender", "busy"]
    assert set(second.changed(ChangeKind.REMOVED)) == {"frequent", "cart_filler", "well_evidenced"}
    assert {s.tag_id for s in second.suppressed} == {"frequent", "cart_filler", "well_evidenced"}


def test_consent_gates_each_tag_on_its_purpose_and_on_profiling() -> None:
    assert "cart_filler" not in _ids(_decide(purposes=frozenset({"profiling"}), budget=5))
    assert _decide(purposes=frozenset({"marketing"}), budget=5).tags == ()
    assert _decide(purposes=frozenset(), budget=5).tags == ()


def test_withdrawal_removes_the_tags_gated_on_the_purpose() -> None:
    current = _carried(_decide(budget=5))
    decision = _decide(purposes=frozenset({"profiling"}), current=current, budget=5)
    assert "cart_filler" not in _ids(decision)
    assert TagChange("cart_filler", ChangeKind.REMOVED, "withdrawal:marketing") in decision.changes
    decision = _decide(purposes=frozenset({"marketing"}), current=current, budget=5)
    assert decision.tags == ()
    assert {c.reason for c in decision.changes} == {"withdrawal:profiling"}


def test_objection_to_one_tag_keeps_it_off_for_good() -> None:
    current = _carried(_decide(budget=5))
    objections = Objections(tag_ids=frozenset({"big_spender"}))
    decision = _decide(objections=objections, current=current, budget=5)
    assert "big_spender" not in _ids(decision)
    assert TagChange("big_spender", ChangeKind.REMOVED, "objection") in decision.changes
    later = _decide(objections=objections, current=_carried(decision), now=NOW + 2 * DAY)
    assert "big_spender" not in _ids(later)
    assert "big_spender" not in [s.tag_id for s in later.suppressed]


def test_objection_to_all_profiling_removes_every_tag() -> None:
    current = _carried(_decide(budget=5))
    decision = _decide(objections=Objections(all_profiling=True), current=current, budget=5)
    assert decision.tags == () and decision.suppressed == ()
    assert {c.reason for c in decision.changes} == {"objection:all_profiling"}
    assert len(decision.changes) == 5


def test_minimum_evidence() -> None:
    assert "well_evidenced" not in _ids(_decide(evidence=4, budget=5))
    assert "well_evidenced" in _ids(_decide(evidence=5, budget=5))
    assert _decide(evidence=0, budget=5).tags == ()


def test_explanation_says_why() -> None:
    decision = _decide(evidence={"big_spender": 6}, latest_evidence_at=NOW - DAY)
    (tag,) = decision.tags
    assert tag == AssignedTag(
        tag_id="big_spender",
        category="value",
        description="Spent over 100 lately.",
        purpose="profiling",
        rule_id="big_spender",
        rule_set_version=7,
        condition="p.spend_90d >= 100",
        field_values={"spend_90d": 250.0},
        evidence_count=6,
        assigned_at=NOW,
        confirmed_at=NOW - DAY,
        expires_at=NOW - DAY + 30 * DAY,
        priority=10,
    )


def test_tag_expires_when_no_new_evidence_confirms_it() -> None:
    current = _carried(_decide(evidence={"frequent": 2}))
    assert current["frequent"].expires_at == NOW + 10 * DAY
    # Re-evaluated without new evidence: nothing changes, even though the condition holds.
    quiet = _decide(evidence={"frequent": 2}, current=current, now=NOW + 9 * DAY)
    assert quiet.changes == () and _carried(quiet) == current
    expired = _decide(evidence={"frequent": 2}, current=current, now=NOW + 10 * DAY)
    assert expired.tags == ()
    assert expired.changes == (TagChange("frequent", ChangeKind.EXPIRED, "no new evidence"),)


def test_tag_whose_condition_fails_stays_until_its_ttl() -> None:
    current = _carried(_decide(evidence={"frequent": 2}))
    fewer_orders = profile_dict({"orders_90d": 1})
    later = NOW + 3 * DAY
    lingering = _decide(
        fewer_orders, evidence={"frequent": 2}, current=current, now=later, latest_evidence_at=later
    )
    assert _carried(lingering) == current and lingering.changes == ()
    gone = _decide(
        fewer_orders,
        evidence={"frequent": 2},
        current=current,
        now=NOW + 10 * DAY,
        latest_evidence_at=later,
    )
    assert gone.changes == (TagChange("frequent", ChangeKind.EXPIRED, "condition no longer holds"),)


def test_new_evidence_renews_keeping_assigned_at_and_refreshing_the_explanation() -> None:
    current = _carried(_decide(evidence={"frequent": 2}))
    later = NOW + 8 * DAY
    more_orders = profile_dict({"orders_90d": 5})
    renewed = _decide(
        more_orders, evidence={"frequent": 4}, current=current, now=later, latest_evidence_at=later
    )
    (tag,) = renewed.tags
    assert renewed.changes == (TagChange("frequent", ChangeKind.RENEWED, "new evidence"),)
    assert tag.assigned_at == NOW
    assert tag.confirmed_at == later and tag.expires_at == later + 10 * DAY
    assert tag.field_values == {"orders_90d": 5} and tag.evidence_count == 4


def test_evidence_older_than_the_ttl_assigns_nothing() -> None:
    stale = _decide(evidence={"frequent": 2}, latest_evidence_at=NOW - 10 * DAY)
    assert stale.tags == ()
    assert _decide(evidence={"frequent": 2}, latest_evidence_at=None).tags == ()
    fresh = _decide(evidence={"frequent": 2}, latest_evidence_at=NOW - 9 * DAY)
    assert fresh.tags[0].expires_at == NOW + DAY


def test_tag_of_a_rule_that_was_removed_is_removed() -> None:
    current = _carried(_decide(budget=5))
    smaller = parse_rule_set(RULES.yaml.replace("  - id: busy", "  - id: bustling"))
    decision = _decide(current=current, rules=smaller, budget=5)
    assert TagChange("busy", ChangeKind.REMOVED, "rule removed") in decision.changes


def test_precomputed_matches_are_used_instead_of_conditions() -> None:
    matches = {rule.id: rule.id == "busy" for rule in RULES.rules}
    decision = assign_tags(
        RULES,
        EVERYTHING,
        evidence_counts={"busy": 3},
        consented_purposes=ALL_PURPOSES,
        current={},
        now=NOW,
        latest_evidence_at=NOW,
        matches=matches,
    )
    assert _ids(decision) == ["busy"]


def test_remove_tags_for_withdrawal_and_objection() -> None:
    current = _carried(_decide(budget=5))
    kept, changes = remove_tags(current, withdrawn_purposes={"marketing"})
    assert "cart_filler" not in kept and len(kept) == 4
    assert changes == [TagChange("cart_filler", ChangeKind.REMOVED, "withdrawal:marketing")]
    kept, changes = remove_tags(current, withdrawn_purposes={"profiling"})
    assert kept == {} and len(changes) == 5
    kept, changes = remove_tags(current, objections=Objections(tag_ids=frozenset({"busy"})))
    assert "busy" not in kept and changes == [TagChange("busy", ChangeKind.REMOVED, "objection")]


def test_audience_below_k_is_never_reported_exactly() -> None:
    assert audience_size_report(49, 50) == (0, True)
    assert audience_size_report(0, 50) == (0, True)
    assert audience_size_report(50, 50) == (50, False)
    assert audience_size_report(1234, 50) == (1234, False)


def _population(size: int) -> ProfileColumns:
    rng = np.random.default_rng(3)
    profiles = [
        profile_dict(
            {
                "spend_90d": float(rng.uniform(0, 150)),
                "orders_90d": int(rng.integers(0, 3)),
                "events_90d": int(rng.integers(0, 20)),
                "cart_additions_30d": int(rng.integers(0, 1) if i % 50 else 1),
            }
        )
        for i in range(size)
    ]
    return ProfileColumns.from_profiles(profiles)


def test_dry_run_reports_coverage_and_warns() -> None:
    columns = _population(400)
    report = dry_run(RULES, columns)
    assert report.population == 400
    coverage = {c.tag_id: c for c in report.coverage}
    matches = evaluate_population(RULES, columns)
    busy = int(matches["busy"].sum())
    assert coverage["busy"].persons == busy and coverage["busy"].share == busy / 400
    assert coverage["cart_filler"].persons == 0 and coverage["cart_filler"].fewer_than_k
    assert coverage["cart_filler"].share == 0.0
    share = busy / 400
    assert share > 0.5
    assert (
        "tags[2]",
        f"'busy' would tag {share:.0%} of the population: more than half, so it says little "
        "about anyone",
    ) in report.warnings
    assert (
        "tags[3]",
        "'cart_filler' would tag fewer than 10 persons (the k floor): its audience could never "
        "be used",
    ) in report.warnings
    expected_average = sum(int(m.sum()) for m in matches.values()) / 400
    assert report.average_tags_per_person == expected_average
    assert any(field == "tag_budget" for field, _ in report.warnings) == (expected_average > 2)


def test_dry_run_applies_minimum_evidence_when_given() -> None:
    columns = _population(100)
    without = {c.tag_id: c.persons for c in dry_run(RULES, columns, k=1).coverage}
    evidence = np.full(100, 4)
    evidence[:10] = 5
    gated = {c.tag_id: c.persons for c in dry_run(RULES, columns, k=1, evidence=evidence).coverage}
    assert without["well_evidenced"] > 10 and gated["well_evidenced"] <= 10
    assert gated["busy"] == without["busy"]


def test_example_rule_set_dry_run_runs() -> None:
    example = parse_rule_set(
        (Path(__file__).resolve().parents[2] / "rules" / "example.yaml").read_text()
    )
    report = dry_run(example, _population(60))
    assert report.population == 60 and len(report.coverage) == len(example.rules)


@settings(max_examples=60, deadline=None)
@given(
    profile=st.fixed_dictionaries(
        {
            "spend_90d": st.floats(0, 300),
            "orders_90d": st.integers(0, 4),
            "events_90d": st.integers(0, 6),
            "cart_additions_30d": st.integers(0, 2),
        }
    ),
    evidence=st.dictionaries(st.sampled_from([r.id for r in RULES.rules]), st.integers(0, 8)),
    purposes=st.frozensets(st.sampled_from(["profiling", "marketing", "analytics"])),
    objected=st.frozensets(st.sampled_from([r.id for r in RULES.rules])),
    all_profiling=st.booleans(),
    budget=st.integers(1, 5),
    elapsed_days=st.integers(0, 40),
    evidence_days_ago=st.one_of(st.none(), st.integers(0, 40)),
)
def test_guardrails_hold(
    profile: dict[str, Any],
    evidence: dict[str, int],
    purposes: frozenset[str],
    objected: frozenset[str],
    all_profiling: bool,
    budget: int,
    elapsed_days: int,
    evidence_days_ago: int | None,
) -> None:
    current = _carried(_decide(budget=5))
    now = NOW + elapsed_days * DAY
    latest = None if evidence_days_ago is None else now - evidence_days_ago * DAY
    objections = Objections(all_profiling, objected)
    decision = _decide(
        profile_dict(profile),
        evidence=evidence,
        purposes=purposes,
        objections=objections,
        current=current,
        now=now,
        latest_evidence_at=latest,
        budget=budget,
    )
    carried = _ids(decision)
    assert len(carried) <= budget
    assert not (set(carried) & {s.tag_id for s in decision.suppressed})
    for tag in decision.tags:
        rule = RULES.rule(tag.tag_id)
        assert rule is not None
        assert objections.reason(tag.tag_id) is None
        assert {"profiling", rule.purpose} <= purposes
        assert tag.expires_at > now
        assert tag.assigned_at <= now
    ranks = [(-t.priority, t.tag_id) for t in decision.tags]
    assert [r[0] for r in ranks] == sorted(r[0] for r in ranks)
    # Every tag that was carried and is no more has a change saying why.
    gone = set(current) - set(carried)
    explained = {c.tag_id for c in decision.changes if c.kind is not ChangeKind.RENEWED}
    assert gone <= explained
