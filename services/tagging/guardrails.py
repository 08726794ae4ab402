"""Guardrails: which of the tags whose rules match a person may actually be carried, and why.

Pure functions over a rule set, one person's profile and state, and an explicit ``now``.

For each rule, in this order:

1. **Objection.** A person who objected to a tag never gets it again; one who objected to all
   profiling gets no tags at all (every tag is profiling, whatever purpose gates it).
2. **Consent.** A tag needs a grant for its own purpose *and* for ``profiling``, the purpose the
   profile is built under. A carried tag whose purpose was withdrawn is removed at once
   (reason ``withdrawal:<purpose>``).
3. **Match.** The condition holds and the rule's evidence count reaches ``min_evidence``.
4. **Evidence and TTL.** A tag lasts ``ttl`` from the newest evidence that confirmed it:
   ``expires_at = latest_evidence_at + ttl``. A matching rule assigns its tag (``assigned_at``
   = now) unless that evidence is already older than the TTL. A carried tag is *re-confirmed*
   only when its rule matches and the person has evidence newer than the tag's
   ``confirmed_at``; then its expiry moves forward and its explanation is refreshed, and
   ``assigned_at`` is kept. Re-evaluating without new evidence changes nothing, so a nightly batch
   can never keep a tag alive by itself. A carried tag whose rule stops matching stays until it
   expires (no flapping around a threshold), and is then dropped as ``expired``. A tag whose rule
   is gone from the rule set is removed at once.
5. **Budget.** At most ``budget`` tags (default the rule set's ``tag_budget``): highest priority
   first, ties to the stronger evidence (the rule's evidence count now), then to the tag id.
   Tags left over are suppressed and listed, with reason ``budget``.

:func:`decide_population` is :func:`assign_tags` for many persons at once: the conditions are
evaluated vectorised over the profiles' columns and every guardrail above is applied to whole
arrays, one rule at a time; the result (tags, suppressions and changes, in the same order) is the
same as calling :func:`assign_tags` for each person.

:func:`dry_run` evaluates a rule set on a whole population (numpy) and warns about tags that
would be uninformative (more than half the population), unusable (fewer than k persons) or
crowded out (more tags per person than the budget on average). Audience sizes below the k floor
are never reported exactly (:func:`audience_size_report`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from services.tagging.profile import FieldValue, ProfileColumns
from services.tagging.rules import ParsedRuleSet, TagRule

PROFILING_PURPOSE: Final = "profiling"
"""The purpose under which profiles are built; every tag needs it granted."""


class ChangeKind(enum.StrEnum):
    ASSIGNED = "assigned"
    RENEWED = "renewed"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    REMOVED = "removed"


REASON_MATCHED: Final = "condition holds"
REASON_NEW_EVIDENCE: Final = "new evidence"
REASON_NO_NEW_EVIDENCE: Final = "no new evidence"
REASON_CONDITION_FAILS: Final = "condition no longer holds"
REASON_BUDGET: Final = "budget"
REASON_OBJECTION: Final = "objection"
REASON_OBJECTION_ALL: Final = "objection:all_profiling"
REASON_RULE_REMOVED: Final = "rule removed"


def withdrawal_reason(purpose: str) -> str:
    return f"withdrawal:{purpose}"


def evidence_count(rule: TagRule, profile: Mapping[str, Any], lifetime_events: int) -> int:
    """The evidence ``min_evidence`` is checked against: the person's events in the rule's
    evidence window (``events_7d``, ``events_30d``, ``events_90d``), or every event held."""
    if rule.evidence_window == "lifetime":
        return lifetime_events
    value = profile.get(f"events_{rule.evidence_window}", 0)
    return value if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True)
class Objections:
    """What a person objected to: single tags, or all profiling."""

    all_profiling: bool = False
    tag_ids: frozenset[str] = frozenset()

    def reason(self, tag_id: str) -> str | None:
        """Why the person may not carry ``tag_id``, or ``None`` when they may."""
        if self.all_profiling:
            return REASON_OBJECTION_ALL
        if tag_id in self.tag_ids:
            return REASON_OBJECTION
        return None


NO_OBJECTIONS: Final = Objections()


@dataclass(frozen=True, slots=True)
class AssignedTag:
    """A tag a person carries, with its explanation."""

    tag_id: str
    category: str
    description: str
    purpose: str
    rule_id: str
    rule_set_version: int
    condition: str
    """The condition text of the rule that (last) confirmed the tag."""
    field_values: Mapping[str, FieldValue]
    """What the condition read when it (last) confirmed the tag, keyed as ``fields_read``."""
    evidence_count: int
    assigned_at: datetime
    """When the tag was first assigned; kept across renewals."""
    confirmed_at: datetime
    """Time of the newest evidence that confirmed it."""
    expires_at: datetime
    priority: int


@dataclass(frozen=True, slots=True)
class SuppressedTag:
    """A tag whose rule matched but that the budget kept off."""

    tag_id: str
    priority: int
    evidence_count: int
    reason: str = REASON_BUDGET


@dataclass(frozen=True, slots=True)
class TagChange:
    tag_id: str
    kind: ChangeKind
    reason: str


@dataclass(frozen=True, slots=True)
class TagDecision:
    """The tags to carry now (highest priority first), what the budget left out, and the changes
    from the tags carried before."""

    tags: tuple[AssignedTag, ...]
    suppressed: tuple[SuppressedTag, ...]
    changes: tuple[TagChange, ...]

    def changed(self, kind: ChangeKind) -> list[str]:
        """Tag ids with a change of ``kind``."""
        return [change.tag_id for change in self.changes if change.kind is kind]


def _missing_purpose(rule_purpose: str, consented_purposes: Collection[str]) -> str | None:
    for purpose in (rule_purpose, PROFILING_PURPOSE):
        if purpose not in consented_purposes:
            return purpose
    return None


def _explained(
    rule: TagRule,
    version: int,
    profile: Mapping[str, Any],
    evidence_count: int,
    *,
    assigned_at: datetime,
    confirmed_at: datetime,
) -> AssignedTag:
    return AssignedTag(
        tag_id=rule.id,
        category=rule.category,
        description=rule.description,
        purpose=rule.purpose,
        rule_id=rule.id,
        rule_set_version=version,
        condition=rule.condition_text,
        field_values=rule.condition.read_values(profile),
        evidence_count=evidence_count,
        assigned_at=assigned_at,
        confirmed_at=confirmed_at,
        expires_at=confirmed_at + rule.ttl,
        priority=rule.priority,
    )


@dataclass
class _Candidate:
    tag: AssignedTag
    evidence: int
    change: TagChange | None
    carried: bool


def assign_tags(
    rule_set: ParsedRuleSet,
    profile: Mapping[str, Any],
    *,
    evidence_counts: Mapping[str, int],
    consented_purposes: Collection[str],
    objections: Objections = NO_OBJECTIONS,
    current: Mapping[str, AssignedTag],
    now: datetime,
    latest_evidence_at: datetime | None,
    budget: int | None = None,
    matches: Mapping[str, bool] | None = None,
) -> TagDecision:
    """Decides one person's tags (see the module docstring for the rules).

    ``evidence_counts`` are per rule id; ``latest_evidence_at`` is the time of the person's
    newest event (``None`` if there is none), clamped to ``now``; ``current`` are the tags the
    person carries, by tag id. ``matches`` may carry each rule's condition result computed in
    bulk (:func:`evaluate_population`), so the conditions are not evaluated again.
    """
    limit = rule_set.tag_budget if budget is None else budget
    evidence_at = None if latest_evidence_at is None else min(latest_evidence_at, now)
    changes: list[TagChange] = []
    candidates: list[_Candidate] = []

    for tag_id in sorted(current):
        tag = current[tag_id]
        rule = rule_set.rule(tag_id)
        if rule is None:
            changes.append(TagChange(tag_id, ChangeKind.REMOVED, REASON_RULE_REMOVED))
            continue
        refused = objections.reason(tag_id)
        if refused is None:
            missing = _missing_purpose(rule.purpose, consented_purposes)
            refused = None if missing is None else withdrawal_reason(missing)
        if refused is not None:
            changes.append(TagChange(tag_id, ChangeKind.REMOVED, refused))

    for rule in rule_set.rules:
        if objections.reason(rule.id) is not None:
            continue
        if _missing_purpose(rule.purpose, consented_purposes) is not None:
            continue
        evidence = evidence_counts.get(rule.id, 0)
        matched = matches[rule.id] if matches is not None else rule.condition.evaluate(profile)
        holds = matched and evidence >= rule.min_evidence
        carried = current.get(rule.id)
        if carried is None:
            if holds and evidence_at is not None and evidence_at + rule.ttl > now:
                tag = _explained(
                    rule,
                    rule_set.version,
                    profile,
                    evidence,
                    assigned_at=now,
                    confirmed_at=evidence_at,
                )
                change = TagChange(rule.id, ChangeKind.ASSIGNED, REASON_MATCHED)
                candidates.append(_Candidate(tag, evidence, change, carried=False))
            continue
        renewed = holds and evidence_at is not None and evidence_at > carried.confirmed_at
        if renewed and evidence_at is not None and evidence_at + rule.ttl > now:
            tag = _explained(
                rule,
                rule_set.version,
                profile,
                evidence,
                assigned_at=carried.assigned_at,
                confirmed_at=evidence_at,
            )
            change = TagChange(rule.id, ChangeKind.RENEWED, REASON_NEW_EVIDENCE)
            candidates.append(_Candidate(tag, evidence, change, carried=True))
        elif carried.expires_at > now:
            candidates.append(_Candidate(carried, evidence, None, carried=True))
        else:
            reason = REASON_NO_NEW_EVIDENCE if holds else REASON_CONDITION_FAILS
            changes.append(TagChange(rule.id, ChangeKind.EXPIRED, reason))

    candidates.sort(key=lambda c: (-c.tag.priority, -c.evidence, c.tag.tag_id))
    kept, left_over = candidates[:limit], candidates[limit:]
    changes.extend(c.change for c in kept if c.change is not None)
    suppressed = []
    for candidate in left_over:
        tag_id = candidate.tag.tag_id
        suppressed.append(SuppressedTag(tag_id, candidate.tag.priority, candidate.evidence))
        kind = ChangeKind.REMOVED if candidate.carried else ChangeKind.SUPPRESSED
        changes.append(TagChange(tag_id, kind, REASON_BUDGET))
    return TagDecision(tuple(c.tag for c in kept), tuple(suppressed), tuple(changes))


def remove_tags(
    current: Mapping[str, AssignedTag],
    *,
    withdrawn_purposes: Collection[str] = (),
    objections: Objections = NO_OBJECTIONS,
) -> tuple[dict[str, AssignedTag], list[TagChange]]:
    """The tags left after a withdrawal or an objection, without re-evaluating any rule.

    A withdrawal of ``profiling`` removes every tag; a withdrawal of another purpose removes the
    tags gated on it.
    """
    kept: dict[str, AssignedTag] = {}
    changes: list[TagChange] = []
    for tag_id in sorted(current):
        tag = current[tag_id]
        reason = objections.reason(tag_id)
        if reason is None:
            for purpose in (tag.purpose, PROFILING_PURPOSE):
                if purpose in withdrawn_purposes:
                    reason = withdrawal_reason(purpose)
                    break
        if reason is None:
            kept[tag_id] = tag
        else:
            changes.append(TagChange(tag_id, ChangeKind.REMOVED, reason))
    return kept, changes


def audience_size_report(size: int, k: int) -> tuple[int, bool]:
    """``(reported size, fewer_than_k)``: a size below ``k`` is reported as 0, never exactly."""
    if size < k:
        return 0, True
    return size, False


# Many persons at once ------------------------------------------------------------------------

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def microseconds(moment: datetime) -> int:
    """A moment as whole microseconds since the epoch: exact for Python's datetimes, so that
    comparisons on arrays agree with comparisons on datetimes."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass(frozen=True, slots=True)
class PersonsState:
    """What the guardrails need to know about many persons, row ``i`` being one person.

    Every person here has a profile, hence events.
    """

    columns: ProfileColumns
    """The persons' profiles as columns (the conditions are evaluated on them)."""
    profiles: Sequence[Mapping[str, Any]]
    """The same profiles one by one (each tag's explanation reads its fields)."""
    lifetime_events: npt.NDArray[np.int64]
    """Events held per person (the ``lifetime`` evidence window)."""
    latest_evidence_at: Sequence[datetime]
    """Time of each person's newest event."""
    consented: Mapping[str, npt.NDArray[np.bool_]]
    """Per purpose, whether each person has it granted (absent purpose: nobody has)."""
    objected_to_all: npt.NDArray[np.bool_]
    objected_to: Mapping[str, npt.NDArray[np.bool_]]
    """Per tag id, who objected to it."""
    carried: Sequence[Mapping[str, AssignedTag]]
    """The tags each person carries, by tag id."""
    afresh: npt.NDArray[np.bool_]
    """Persons whose tags are decided as if they carried none (after an unmerge); the tags they
    carried and do not get again are removed with ``afresh_reason``."""


@dataclass(frozen=True, slots=True)
class PopulationDecision:
    """What changes for many persons: rows of tags to (re)write and to delete, each person's
    suppressed tags, and the changes, in the order :func:`assign_tags` gives them."""

    written: list[tuple[int, AssignedTag]]
    """Tags assigned or renewed, by row."""
    deleted: list[tuple[int, str]]
    """Carried tags whose row goes (removed, expired, over the budget, or rewritten)."""
    suppressed: dict[int, list[SuppressedTag]]
    """Per row with any, the tags the budget kept off."""
    changes: list[tuple[int, TagChange, datetime | None]]
    """(row, change, the tag's new expiry for assignments and renewals), by row."""


def _rows(mask: npt.NDArray[np.bool_]) -> list[int]:
    return np.flatnonzero(mask).tolist()  # type: ignore[no-any-return]


def decide_population(
    rule_set: ParsedRuleSet,
    state: PersonsState,
    *,
    now: datetime,
    afresh_reason: str,
    budget: int | None = None,
) -> PopulationDecision:
    """:func:`assign_tags` for every row of ``state``, with arrays instead of loops."""
    n = state.columns.size
    rules = rule_set.rules
    limit = rule_set.tag_budget if budget is None else budget
    now_us = microseconds(now)
    latest_us = np.fromiter(
        (microseconds(moment) for moment in state.latest_evidence_at), dtype=np.int64, count=n
    )
    evidence_us = np.minimum(latest_us, now_us)
    evidence_at = [min(moment, now) for moment in state.latest_evidence_at]
    no = np.zeros(n, dtype=bool)
    profiling = state.consented.get(PROFILING_PURPOSE, no)

    # The carried tags as (row, rule) matrices; tags of rules no longer in the set apart.
    index = {rule.id: j for j, rule in enumerate(rules)}
    shape = (n, len(rules))
    carried = np.zeros(shape, dtype=bool)
    confirmed_us = np.zeros(shape, dtype=np.int64)
    expires_us = np.zeros(shape, dtype=np.int64)
    carried_priority = np.zeros(shape, dtype=np.int64)
    orphans: list[tuple[int, str]] = []
    for row in _rows(~state.afresh) if n else []:
        for tag_id, tag in state.carried[row].items():
            j = index.get(tag_id)
            if j is None:
                orphans.append((row, tag_id))
                continue
            carried[row, j] = True
            confirmed_us[row, j] = microseconds(tag.confirmed_at)
            expires_us[row, j] = microseconds(tag.expires_at)
            carried_priority[row, j] = tag.priority
    universe = sorted(
        {rule.id for rule in rules} | {tag_id for tags in state.carried for tag_id in tags}
    )
    tag_rank = {tag_id: k for k, tag_id in enumerate(universe)}

    evidence = np.zeros(shape, dtype=np.int64)
    priority = np.zeros(shape, dtype=np.int64)
    candidate = np.zeros(shape, dtype=bool)
    new = np.zeros(shape, dtype=bool)
    renewed = np.zeros(shape, dtype=bool)
    # (row, phase, order within the phase, change, expiry): sorted into assign_tags's order.
    changes: list[tuple[int, int, int, TagChange, datetime | None]] = []
    deleted: list[tuple[int, str]] = list(orphans)
    changes.extend(
        (row, 0, tag_rank[tag_id], TagChange(tag_id, ChangeKind.REMOVED, REASON_RULE_REMOVED), None)
        for row, tag_id in orphans
    )
    for j, rule in enumerate(rules):
        objected = state.objected_to.get(rule.id, no)
        own_purpose = state.consented.get(rule.purpose, no)
        allowed = own_purpose & profiling & ~state.objected_to_all & ~objected
        counts = _evidence_column(rule, state)
        evidence[:, j] = counts
        holds = rule.condition.evaluate_batch(state.columns) & (counts >= rule.min_evidence)
        fresh = evidence_us + rule.ttl // _MICROSECOND > now_us
        held = carried[:, j]
        new[:, j] = allowed & ~held & holds & fresh
        renewed[:, j] = allowed & held & holds & (evidence_us > confirmed_us[:, j]) & fresh
        kept = allowed & held & ~renewed[:, j] & (expires_us[:, j] > now_us)
        expired = allowed & held & ~renewed[:, j] & ~kept
        candidate[:, j] = new[:, j] | renewed[:, j] | kept
        priority[:, j] = np.where(kept, carried_priority[:, j], rule.priority)

        refused = held & ~allowed
        for row in _rows(refused):
            reason = (
                REASON_OBJECTION_ALL
                if state.objected_to_all[row]
                else REASON_OBJECTION
                if objected[row]
                else withdrawal_reason(rule.purpose)
                if not own_purpose[row]
                else withdrawal_reason(PROFILING_PURPOSE)
            )
            changes.append(
                (row, 0, tag_rank[rule.id], TagChange(rule.id, ChangeKind.REMOVED, reason), None)
            )
            deleted.append((row, rule.id))
        for row in _rows(expired):
            reason = REASON_NO_NEW_EVIDENCE if holds[row] else REASON_CONDITION_FAILS
            changes.append((row, 1, j, TagChange(rule.id, ChangeKind.EXPIRED, reason), None))
            deleted.append((row, rule.id))

    # The budget: per row, candidates by priority (highest first), evidence, then tag id.
    ranks = np.broadcast_to(np.array([tag_rank[rule.id] for rule in rules], dtype=np.int64), shape)
    order = np.lexsort((ranks, -evidence, -priority, ~candidate), axis=1)
    position = np.empty(shape, dtype=np.int64)
    np.put_along_axis(position, order, np.broadcast_to(np.arange(len(rules)), shape), axis=1)
    within = candidate & (position < limit)
    over = candidate & (position >= limit)

    written: list[tuple[int, AssignedTag]] = []
    kept_ids: dict[int, set[str]] = {}
    suppressed: dict[int, list[tuple[int, SuppressedTag]]] = {}
    for j, rule in enumerate(rules):
        for row in _rows(within[:, j] & (new[:, j] | renewed[:, j])):
            is_new = bool(new[row, j])
            tag = _explained(
                rule,
                rule_set.version,
                state.profiles[row],
                int(evidence[row, j]),
                assigned_at=now if is_new else state.carried[row][rule.id].assigned_at,
                confirmed_at=evidence_at[row],
            )
            change = (
                TagChange(rule.id, ChangeKind.ASSIGNED, REASON_MATCHED)
                if is_new
                else TagChange(rule.id, ChangeKind.RENEWED, REASON_NEW_EVIDENCE)
            )
            changes.append((row, 2, int(position[row, j]), change, tag.expires_at))
            written.append((row, tag))
            if not is_new:
                deleted.append((row, rule.id))
        for row in _rows(within[:, j] & state.afresh):
            kept_ids.setdefault(row, set()).add(rule.id)
        for row in _rows(over[:, j]):
            was_carried = bool(carried[row, j])
            tag_priority = int(priority[row, j])
            suppressed.setdefault(row, []).append(
                (
                    int(position[row, j]),
                    SuppressedTag(rule.id, tag_priority, int(evidence[row, j])),
                )
            )
            kind = ChangeKind.REMOVED if was_carried else ChangeKind.SUPPRESSED
            changes.append(
                (row, 3, int(position[row, j]), TagChange(rule.id, kind, REASON_BUDGET), None)
            )
            if was_carried:
                deleted.append((row, rule.id))

    for row in _rows(state.afresh):
        again = kept_ids.get(row, set())
        for tag_id in state.carried[row]:
            deleted.append((row, tag_id))
            if tag_id not in again:
                change = TagChange(tag_id, ChangeKind.REMOVED, afresh_reason)
                changes.append((row, 4, tag_rank[tag_id], change, None))

    changes.sort(key=lambda item: (item[0], item[1], item[2]))
    return PopulationDecision(
        written=written,
        deleted=deleted,
        suppressed={
            row: [tag for _, tag in sorted(entries, key=lambda entry: entry[0])]
            for row, entries in suppressed.items()
        },
        changes=[(row, change, expiry) for row, _, _, change, expiry in changes],
    )


def _evidence_column(rule: TagRule, state: PersonsState) -> npt.NDArray[np.int64]:
    if rule.evidence_window == "lifetime":
        return state.lifetime_events
    column: npt.NDArray[np.int64] = state.columns.scalar(f"events_{rule.evidence_window}")
    return column


# Population-wide evaluation ----------------------------------------------------------------------


def evaluate_population(
    rule_set: ParsedRuleSet, columns: ProfileColumns
) -> dict[str, npt.NDArray[np.bool_]]:
    """Each rule's condition on every row of ``columns`` (vectorised), by rule id."""
    return {rule.id: rule.condition.evaluate_batch(columns) for rule in rule_set.rules}


@dataclass(frozen=True, slots=True)
class TagCoverage:
    tag_id: str
    persons: int
    """0 when ``fewer_than_k``: never reported exactly below k."""
    fewer_than_k: bool
    share: float
    """Share of the population (0 when ``fewer_than_k``)."""


@dataclass(frozen=True, slots=True)
class DryRunReport:
    population: int
    coverage: tuple[TagCoverage, ...]
    warnings: tuple[tuple[str, str], ...]
    """``(field, description)``, e.g. ``("tags[3]", "… more than half …")``."""
    average_tags_per_person: float
    """Matching tags per person before the budget applies."""
    matches: Mapping[str, npt.NDArray[np.bool_]] = field(repr=False, default_factory=dict)


def dry_run(
    rule_set: ParsedRuleSet,
    columns: ProfileColumns,
    *,
    k: int | None = None,
    budget: int | None = None,
    evidence: Mapping[str, npt.ArrayLike] | npt.ArrayLike | None = None,
) -> DryRunReport:
    """What the rule set would do to the population in ``columns``; stores and changes nothing.

    ``evidence`` is each person's evidence count (one array for every rule, or arrays by rule
    id); when given, ``min_evidence`` applies. Consent, objections and the TTL are ignored: this
    measures the rules, not the people's choices.
    """
    k_floor = rule_set.k_floor if k is None else k
    limit = rule_set.tag_budget if budget is None else budget
    population = columns.size
    matches = evaluate_population(rule_set, columns)
    coverage: list[TagCoverage] = []
    warnings: list[tuple[str, str]] = []
    total = np.zeros(population, dtype=np.int64)
    for index, rule in enumerate(rule_set.rules):
        matched = matches[rule.id]
        counts = _evidence_for(rule.id, evidence, population)
        if counts is not None:
            matched = matched & (counts >= rule.min_evidence)
            matches[rule.id] = matched
        total += matched
        persons = int(matched.sum())
        share = persons / population if population else 0.0
        reported, fewer = audience_size_report(persons, k_floor)
        coverage.append(TagCoverage(rule.id, reported, fewer, 0.0 if fewer else share))
        if share > 0.5:
            warnings.append(
                (
                    f"tags[{index}]",
                    f"{rule.id!r} would tag {share:.0%} of the population: more than half, "
                    "so it says little about anyone",
                )
            )
        if fewer:
            warnings.append(
                (
                    f"tags[{index}]",
                    f"{rule.id!r} would tag fewer than {k_floor} persons (the k floor): its "
                    "audience could never be used",
                )
            )
    average = float(total.mean()) if population else 0.0
    if average > limit:
        warnings.append(
            (
                "tag_budget",
                f"a person would match {average:.2f} tags on average, above the budget of "
                f"{limit}: lower-priority tags would be suppressed",
            )
        )
    return DryRunReport(population, tuple(coverage), tuple(warnings), average, matches)


def _evidence_for(
    rule_id: str,
    evidence: Mapping[str, npt.ArrayLike] | npt.ArrayLike | None,
    population: int,
) -> npt.NDArray[np.int64] | None:
    if evidence is None:
        return None
    if isinstance(evidence, Mapping):
        if rule_id not in evidence:
            return np.zeros(population, dtype=np.int64)
        return np.asarray(evidence[rule_id], dtype=np.int64)
    return np.asarray(evidence, dtype=np.int64)
