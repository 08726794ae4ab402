"""Rule sets: the YAML document operators write, validated and compiled.

A rule set looks like this (``rules/example.yaml`` is a complete one)::

    tag_budget: 5            # tags per person, default 5
    k_floor: 50              # smallest audience ever returned, default 50 (at least 10)
    banned_categories:       # operator's bans on top of the built-in sensitive ones
      - gambling
      - id: alcohol
        terms: [beer, wine, spirits]
    tags:
      - id: big_spender                  # lower snake case, unique
        category: value                  # never a sensitive category
        description: Spent over 500 in the last 90 days, across at least two orders.
        purpose: profiling               # purpose that must be granted, default profiling
        condition: p.spend_90d >= 500.0 && p.orders_90d >= 2
        min_evidence: 3                  # events in the evidence window, default 1
        evidence_window: 90d             # 7d, 30d, 90d (default) or lifetime
        ttl: 30d                         # lifetime without new evidence, default 30d
        priority: 50                     # higher wins under the budget, default 0

Durations are a whole number of days or hours: ``30d``, ``12h`` (no minutes, so ``6m`` can't be
mistaken for six months), from 1 hour to 365 days. Every problem is reported with its place
(``tags[2].condition``), all at once.

``min_evidence`` counts the person's events in the rule's ``evidence_window``: the trailing 7, 30
or 90 days (``events_7d`` … ``events_90d``), or ``lifetime``, every event tagging holds for the
person. A tag about absence (``p.lifecycle == "churned"``: nothing for 90 days) has no recent
events by definition, so it counts its evidence over the lifetime.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Final

import yaml
import yaml.composer
import yaml.constructor
import yaml.nodes

from services.common.errors import FieldViolations, InvalidArgument
from services.tagging.compiler import CompiledCondition, ConditionError, compile_condition
from services.tagging.sensitive import (
    SensitiveCategory,
    SensitiveScreen,
    normalise_category,
    operator_category,
    sensitive_screen,
)

DEFAULT_PURPOSE: Final = "profiling"
DEFAULT_TAG_BUDGET: Final = 5
DEFAULT_K_FLOOR: Final = 50
DEFAULT_MIN_EVIDENCE: Final = 1
DEFAULT_TTL: Final = timedelta(days=30)
EVIDENCE_WINDOWS: Final = ("7d", "30d", "90d", "lifetime")
"""Where ``min_evidence`` counts events: a trailing window, or every event held."""
DEFAULT_EVIDENCE_WINDOW: Final = "90d"
MIN_K_FLOOR: Final = 10
MAX_TAG_BUDGET: Final = 50
MAX_TAGS: Final = 200
MAX_YAML_BYTES: Final = 1024 * 1024
MAX_DESCRIPTION: Final = 500
MAX_ID: Final = 64
MIN_TTL: Final = timedelta(hours=1)
MAX_TTL: Final = timedelta(days=365)
MAX_MIN_EVIDENCE: Final = 1_000_000
MAX_PRIORITY: Final = 1_000_000
MAX_YAML_DEPTH: Final = 32
"""Nesting a rule set never needs more than four levels; PyYAML composes recursively, so a
deeper document (``[[[[…``) would otherwise end in RecursionError instead of a problem."""

_SNAKE: Final = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_DURATION: Final = re.compile(r"(\d{1,6})([dh])")
_TOP_LEVEL_KEYS: Final = ("tags", "tag_budget", "k_floor", "banned_categories")
_TAG_KEYS: Final = (
    "id",
    "category",
    "description",
    "purpose",
    "condition",
    "min_evidence",
    "evidence_window",
    "ttl",
    "priority",
)


@dataclass(frozen=True, slots=True)
class TagRule:
    """One tag: what it means, when it applies, and how it is held in check."""

    id: str
    category: str
    description: str
    purpose: str
    condition: CompiledCondition
    min_evidence: int
    ttl: timedelta
    priority: int
    evidence_window: str = DEFAULT_EVIDENCE_WINDOW
    """One of :data:`EVIDENCE_WINDOWS`: where ``min_evidence`` counts events."""

    @property
    def condition_text(self) -> str:
        return self.condition.text

    @property
    def fields_read(self) -> tuple[str, ...]:
        return self.condition.fields_read


@dataclass(frozen=True, slots=True)
class ParsedRuleSet:
    """A valid rule set with its conditions compiled; ``version`` is 0 until it is stored."""

    yaml: str
    rules: tuple[TagRule, ...]
    tag_budget: int = DEFAULT_TAG_BUDGET
    k_floor: int = DEFAULT_K_FLOOR
    extra_banned_categories: tuple[str, ...] = ()
    version: int = 0
    _by_id: Mapping[str, TagRule] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {rule.id: rule for rule in self.rules})

    def rule(self, rule_id: str) -> TagRule | None:
        return self._by_id.get(rule_id)

    def with_version(self, version: int) -> ParsedRuleSet:
        return replace(self, version=version)


class RuleSetError(InvalidArgument):
    """A rule set that cannot be stored; ``problems`` lists every ``(field, description)``."""

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        super().__init__(list(problems), "invalid rule set")

    @property
    def problems(self) -> tuple[tuple[str, str], ...]:
        return self.violations


def parse_duration(text: str) -> timedelta:
    """``30d`` → 30 days, ``12h`` → 12 hours; anything else raises ``ValueError``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write whole days or hours, e.g. 30d or 12h")
    amount, unit = int(match.group(1)), match.group(2)
    return timedelta(days=amount) if unit == "d" else timedelta(hours=amount)


def format_duration(duration: timedelta) -> str:
    """The shortest ``parse_duration`` text for a whole number of hours."""
    hours = int(duration.total_seconds()) // 3600
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


_QUOTING_HINT: Final = (
    " (a condition starting with ! or a quote must be quoted as a whole, or written as a >- block)"
)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without aliases (no billion laughs), without silently repeated keys, and no
    deeper than :data:`MAX_YAML_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: yaml.nodes.Node | None, index: Any) -> yaml.nodes.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", event.start_mark
            )
        if self._depth >= MAX_YAML_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.nodes.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: PyYAML's own check refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load(text: str, problems: FieldViolations) -> Any:
    if len(text.encode()) > MAX_YAML_BYTES:
        problems.add("yaml", f"the document is larger than {MAX_YAML_BYTES} bytes")
        return None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or "invalid YAML"
        hint = _QUOTING_HINT if "tag '!" in problem or "found '<scalar>'" in problem else ""
        problems.add("yaml", f"{problem}{where}{hint}")
    except yaml.YAMLError as error:
        problems.add("yaml", f"invalid YAML: {error}")
    return None


def _integer(
    value: Any, path: str, problems: FieldViolations, *, default: int, low: int, high: int
) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(path, f"must be a whole number, not {value!r}")
        return default
    if not low <= value <= high:
        problems.add(path, f"must be between {low} and {high}, not {value}")
        return default
    return value


def _string(value: Any, path: str, problems: FieldViolations, *, required: bool) -> str | None:
    if value is None:
        if required:
            problems.add(path, "is required")
        return None
    if not isinstance(value, str):
        problems.add(path, f"must be a string, not {value!r}")
        return None
    if required and not value.strip():
        problems.add(path, "must not be empty")
        return None
    return value


def _extra_categories(value: Any, problems: FieldViolations) -> list[SensitiveCategory]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add("banned_categories", "must be a list of category names")
        return []
    categories = []
    for index, item in enumerate(value):
        path = f"banned_categories[{index}]"
        try:
            if isinstance(item, str):
                categories.append(operator_category(item))
            elif isinstance(item, Mapping) and isinstance(item.get("id"), str):
                unknown = set(item) - {"id", "terms"}
                terms = item.get("terms", [])
                if unknown:
                    problems.add(path, f"unknown keys {sorted(map(str, unknown))}: use id, terms")
                elif not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                    problems.add(f"{path}.terms", "must be a list of strings")
                else:
                    categories.append(operator_category(item["id"], terms))
            else:
                problems.add(path, "must be a category name or {id, terms}")
        except ValueError as error:
            problems.add(path, str(error))
    return categories


def _sensitive_message(screen: SensitiveScreen, text: str, what: str) -> list[str]:
    messages = []
    for finding in screen.screen(text):
        category = screen.categories[finding.category]
        messages.append(
            f"{what} names {finding.matched!r}, which reveals {category.label} "
            f"({category.law}): tags must not infer sensitive categories"
        )
    return messages


@dataclass
class _TagParser:
    screen: SensitiveScreen
    known_purposes: Collection[str] | None
    problems: FieldViolations
    first_seen: dict[str, int] = field(default_factory=dict)

    def parse(self, index: int, raw: Any) -> TagRule | None:
        path = f"tags[{index}]"
        if not isinstance(raw, Mapping):
            self.problems.add(path, "must be a mapping with id, category, description, condition")
            return None
        before = len(self.problems)
        for key in raw:
            if key not in _TAG_KEYS:
                self.problems.add(
                    f"{path}.{key}", f"unknown key (expected one of {', '.join(_TAG_KEYS)})"
                )
        tag_id = self.tag_id(raw.get("id"), f"{path}.id", index)
        category = self.category(raw.get("category"), f"{path}.category")
        description = self.description(raw.get("description"), f"{path}.description")
        purpose = self.purpose(raw.get("purpose"), f"{path}.purpose")
        condition = self.condition(raw.get("condition"), f"{path}.condition")
        min_evidence = _integer(
            raw.get("min_evidence"),
            f"{path}.min_evidence",
            self.problems,
            default=DEFAULT_MIN_EVIDENCE,
            low=1,
            high=MAX_MIN_EVIDENCE,
        )
        window = self.evidence_window(raw.get("evidence_window"), f"{path}.evidence_window")
        ttl = self.ttl(raw.get("ttl"), f"{path}.ttl")
        priority = _integer(
            raw.get("priority"),
            f"{path}.priority",
            self.problems,
            default=0,
            low=-MAX_PRIORITY,
            high=MAX_PRIORITY,
        )
        if len(self.problems) > before:
            return None
        assert tag_id and category and description and purpose and condition
        return TagRule(
            tag_id, category, description, purpose, condition, min_evidence, ttl, priority, window
        )

    def tag_id(self, value: Any, path: str, index: int) -> str | None:
        tag_id = _string(value, path, self.problems, required=True)
        if tag_id is None:
            return None
        valid = True
        if len(tag_id) > MAX_ID or not _SNAKE.fullmatch(tag_id):
            self.problems.add(path, f"{tag_id!r} is not lower snake case of 1 to {MAX_ID} chars")
            valid = False
        elif tag_id in self.first_seen:
            first = self.first_seen[tag_id]
            self.problems.add(path, f"duplicate id {tag_id!r} (first at tags[{first}])")
            valid = False
        else:
            self.first_seen[tag_id] = index
        messages = _sensitive_message(self.screen, tag_id, f"the id {tag_id!r}")
        for message in messages:
            self.problems.add(path, message)
        return tag_id if valid and not messages else None

    def category(self, value: Any, path: str) -> str | None:
        category = _string(value, path, self.problems, required=True)
        if category is None:
            return None
        if not _SNAKE.fullmatch(category):
            self.problems.add(path, f"{category!r} is not lower snake case")
            return None
        banned = self.screen.banned_category(category)
        if banned is not None:
            exact = normalise_category(category) == banned.id
            how = "is" if exact else "reveals"
            self.problems.add(
                path,
                f"{category!r} {how} the banned category {banned.label} ({banned.law})",
            )
            return None
        return category

    def description(self, value: Any, path: str) -> str | None:
        description = _string(value, path, self.problems, required=True)
        if description is None:
            return None
        if len(description) > MAX_DESCRIPTION:
            self.problems.add(path, f"longer than {MAX_DESCRIPTION} characters")
            return None
        messages = _sensitive_message(self.screen, description, "the description")
        for message in messages:
            self.problems.add(path, message)
        return None if messages else description.strip()

    def purpose(self, value: Any, path: str) -> str | None:
        if value is None:
            return DEFAULT_PURPOSE
        purpose = _string(value, path, self.problems, required=True)
        if purpose is None:
            return None
        if not _SNAKE.fullmatch(purpose):
            self.problems.add(path, f"{purpose!r} is not a purpose id (lower snake case)")
            return None
        if self.known_purposes is not None and purpose not in self.known_purposes:
            known = ", ".join(sorted(self.known_purposes))
            self.problems.add(path, f"unknown purpose {purpose!r} (known: {known})")
            return None
        return purpose

    def condition(self, value: Any, path: str) -> CompiledCondition | None:
        text = _string(value, path, self.problems, required=True)
        if text is None:
            return None
        try:
            compiled = compile_condition(text.strip())
        except ConditionError as error:
            self.problems.add(path, str(error))
            return None
        messages = [
            message
            for literal in compiled.literals
            for message in _sensitive_message(self.screen, literal, f"the string {literal!r}")
        ]
        for message in messages:
            self.problems.add(path, message)
        return None if messages else compiled

    def evidence_window(self, value: Any, path: str) -> str:
        if value is None:
            return DEFAULT_EVIDENCE_WINDOW
        if value not in EVIDENCE_WINDOWS:
            self.problems.add(path, f"must be one of {', '.join(EVIDENCE_WINDOWS)}, not {value!r}")
            return DEFAULT_EVIDENCE_WINDOW
        return str(value)

    def ttl(self, value: Any, path: str) -> timedelta:
        if value is None:
            return DEFAULT_TTL
        if not isinstance(value, str):
            self.problems.add(path, f"must be a duration such as 30d or 12h, not {value!r}")
            return DEFAULT_TTL
        try:
            ttl = parse_duration(value)
        except ValueError as error:
            self.problems.add(path, str(error))
            return DEFAULT_TTL
        if not MIN_TTL <= ttl <= MAX_TTL:
            self.problems.add(path, "must be between 1h and 365d")
            return DEFAULT_TTL
        return ttl


def parse_rule_set(
    yaml_text: str,
    *,
    extra_banned: Iterable[SensitiveCategory | str] = (),
    known_purposes: Collection[str] | None = None,
) -> ParsedRuleSet:
    """Validates and compiles a rule set, or raises :class:`RuleSetError` listing every problem.

    ``extra_banned`` are the operator's own banned categories (from settings) on top of the
    built-in ones and of those the document names; ``known_purposes``, when given, are the
    purposes a tag may be gated on.
    """
    problems = FieldViolations()
    document = _load(yaml_text, problems)
    if problems:
        raise RuleSetError(problems)
    if not isinstance(document, Mapping):
        raise RuleSetError([("yaml", "the document must be a mapping with a `tags` list")])
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            problems.add(str(key), f"unknown key (expected one of {', '.join(_TOP_LEVEL_KEYS)})")
    tag_budget = _integer(
        document.get("tag_budget"),
        "tag_budget",
        problems,
        default=DEFAULT_TAG_BUDGET,
        low=1,
        high=MAX_TAG_BUDGET,
    )
    k_floor = _integer(
        document.get("k_floor"),
        "k_floor",
        problems,
        default=DEFAULT_K_FLOOR,
        low=MIN_K_FLOOR,
        high=10_000_000,
    )
    document_extras = _extra_categories(document.get("banned_categories"), problems)
    screen = sensitive_screen((*extra_banned, *document_extras))
    tags = document.get("tags")
    rules: list[TagRule] = []
    if not isinstance(tags, list):
        problems.add("tags", "is required: a list of tags")
    elif len(tags) > MAX_TAGS:
        problems.add("tags", f"at most {MAX_TAGS} tags")
    else:
        parser = _TagParser(screen, known_purposes, problems)
        for index, raw in enumerate(tags):
            rule = parser.parse(index, raw)
            if rule is not None:
                rules.append(rule)
    if problems:
        raise RuleSetError(problems)
    return ParsedRuleSet(
        yaml=yaml_text,
        rules=tuple(rules),
        tag_budget=tag_budget,
        k_floor=k_floor,
        extra_banned_categories=tuple(category.id for category in document_extras),
    )


def rule_problems(
    yaml_text: str,
    *,
    extra_banned: Iterable[SensitiveCategory | str] = (),
    known_purposes: Collection[str] | None = None,
) -> tuple[ParsedRuleSet | None, Sequence[tuple[str, str]]]:
    """:func:`parse_rule_set` without raising: the rule set, or ``None`` and its problems."""
    try:
        return parse_rule_set(
            yaml_text, extra_banned=extra_banned, known_purposes=known_purposes
        ), ()
    except RuleSetError as error:
        return None, error.problems
