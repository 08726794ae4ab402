"""Rules against over-merging: identifier priorities, per-person limits, blocklists, hubs.

A rules version is immutable; PutRules stores a new one and every decision records the version
it was made under.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Final, TypeAlias

from steward.common.v1 import common_pb2

from services.common.errors import FieldViolations
from services.common.identifiers import hash_message, is_junk, type_name

IdentifierType: TypeAlias = common_pb2.IdentifierType.ValueType
T = common_pb2

DEFAULT_PRIORITY: Final = (
    T.IDENTIFIER_TYPE_CRM_ID,
    T.IDENTIFIER_TYPE_EMAIL,
    T.IDENTIFIER_TYPE_PHONE,
    T.IDENTIFIER_TYPE_LOYALTY_CARD,
    T.IDENTIFIER_TYPE_CUSTOM,
    T.IDENTIFIER_TYPE_DEVICE_ID,
    T.IDENTIFIER_TYPE_COOKIE_ID,
)
DEFAULT_HUB_THRESHOLD: Final = 5
MAX_PATTERNS: Final = 100
MAX_VALUES: Final = 10_000


@dataclass(frozen=True, slots=True)
class TypeLimit:
    """At most ``max_per_person`` identifiers of a type (and namespace, and source) per person."""

    type: IdentifierType
    max_per_person: int
    namespace: str = ""
    source: str = ""

    def counts(self, type_: IdentifierType, namespace: str, sources: Iterable[str]) -> bool:
        """Whether an identifier of this type, namespace and sources counts against the limit."""
        if type_ != self.type or (self.namespace and namespace != self.namespace):
            return False
        return not self.source or self.source in sources


@dataclass(frozen=True)
class MergeRules:
    """One version of the rules."""

    version: int = 0
    priority: tuple[IdentifierType, ...] = DEFAULT_PRIORITY
    limits: tuple[TypeLimit, ...] = (
        TypeLimit(T.IDENTIFIER_TYPE_CRM_ID, 1),
        TypeLimit(T.IDENTIFIER_TYPE_EMAIL, 3),
        TypeLimit(T.IDENTIFIER_TYPE_PHONE, 3),
        TypeLimit(T.IDENTIFIER_TYPE_LOYALTY_CARD, 2),
        TypeLimit(T.IDENTIFIER_TYPE_DEVICE_ID, 10),
    )
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[str, ...] = ()
    hub_threshold: int = DEFAULT_HUB_THRESHOLD
    actor: str = "default"
    created_at: datetime | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _ranks: dict[IdentifierType, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.blocked_patterns))
        ranks: dict[IdentifierType, int] = {}
        for rank, type_ in enumerate(self.priority):
            ranks.setdefault(type_, rank)
        object.__setattr__(self, "_ranks", ranks)

    def rank(self, type_: IdentifierType) -> int:
        """0 for the highest priority; types not listed rank below every listed one."""
        return self._ranks.get(type_, len(self.priority))

    def is_blocked(self, normalised: str) -> bool:
        """Whether a normalised raw value must never link (built-in junk or configured)."""
        return (
            is_junk(normalised)
            or normalised in self.blocked_values
            or normalised.casefold() in self.blocked_values
            or any(pattern.fullmatch(normalised) for pattern in self._compiled)
        )

    @cached_property
    def _blocked_messages(self) -> tuple[bytes, ...]:
        return tuple(
            hash_message(type_, "", value)
            for value in self.blocked_values
            for type_ in common_pb2.IdentifierType.values()
            if type_ not in (T.IDENTIFIER_TYPE_UNSPECIFIED, T.IDENTIFIER_TYPE_CUSTOM)
        )

    def blocked_messages(self) -> tuple[bytes, ...]:
        """Hash messages of the configured blocked values, to recognise pre-hashed identifiers."""
        return self._blocked_messages

    def exceeded_limit(
        self, held: Iterable[tuple[IdentifierType, str, frozenset[str]]]
    ) -> TypeLimit | None:
        """The first limit that identifiers ``held`` (type, namespace, sources) would break."""
        held = list(held)
        for limit in self.limits:
            if sum(limit.counts(t, ns, sources) for t, ns, sources in held) > limit.max_per_person:
                return limit
        return None


def describe_limit(limit: TypeLimit) -> str:
    where = f" from source {limit.source!r}" if limit.source else ""
    namespace = f" ({limit.namespace})" if limit.namespace else ""
    return (
        f"limit: at most {limit.max_per_person} {type_name(limit.type)}{namespace} "
        f"identifiers per person{where}"
    )


def validate_rules(
    priority: Iterable[IdentifierType],
    limits: Iterable[TypeLimit],
    blocked_values: Iterable[str],
    blocked_patterns: Iterable[str],
    hub_threshold: int,
) -> FieldViolations:
    """Field violations of a proposed rules version (empty when it is acceptable)."""
    violations = FieldViolations()
    known = set(common_pb2.IdentifierType.values()) - {T.IDENTIFIER_TYPE_UNSPECIFIED}
    priority = list(priority)
    for index, type_ in enumerate(priority):
        violations.check(type_ in known, f"rules.priority[{index}]", "unknown identifier type")
    duplicates = [t for t, n in Counter(priority).items() if n > 1]
    violations.check(not duplicates, "rules.priority", "each type may appear only once")
    for index, limit in enumerate(limits):
        path = f"rules.limits[{index}]"
        violations.check(limit.type in known, f"{path}.type", "unknown identifier type")
        violations.check(limit.max_per_person >= 1, f"{path}.max_per_person", "must be at least 1")
    values = list(blocked_values)
    violations.check(len(values) <= MAX_VALUES, "rules.blocked_values", f"at most {MAX_VALUES}")
    patterns = list(blocked_patterns)
    violations.check(
        len(patterns) <= MAX_PATTERNS, "rules.blocked_patterns", f"at most {MAX_PATTERNS}"
    )
    for index, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as error:
            violations.add(f"rules.blocked_patterns[{index}]", f"not a regular expression: {error}")
    violations.check(hub_threshold >= 1, "rules.hub_threshold", "must be at least 1")
    return violations


def rules_document(rules: MergeRules) -> Mapping[str, object]:
    """A JSON-able form for storage."""
    return {
        "priority": [int(t) for t in rules.priority],
        "limits": [
            {
                "type": int(limit.type),
                "max_per_person": limit.max_per_person,
                "namespace": limit.namespace,
                "source": limit.source,
            }
            for limit in rules.limits
        ],
        "blocked_values": sorted(rules.blocked_values),
        "blocked_patterns": list(rules.blocked_patterns),
        "hub_threshold": rules.hub_threshold,
    }


def rules_from_document(
    document: Mapping[str, object], *, version: int, actor: str, created_at: datetime | None
) -> MergeRules:
    limits = document.get("limits", [])
    assert isinstance(limits, list)
    priority = document.get("priority", [])
    assert isinstance(priority, list)
    values = document.get("blocked_values", [])
    patterns = document.get("blocked_patterns", [])
    assert isinstance(values, list) and isinstance(patterns, list)
    threshold = document.get("hub_threshold", DEFAULT_HUB_THRESHOLD)
    assert isinstance(threshold, int)
    return MergeRules(
        version=version,
        priority=tuple(IdentifierType(int(t)) for t in priority),
        limits=tuple(
            TypeLimit(
                IdentifierType(int(item["type"])),
                int(item["max_per_person"]),
                str(item.get("namespace", "")),
                str(item.get("source", "")),
            )
            for item in limits
        ),
        blocked_values=frozenset(str(v) for v in values),
        blocked_patterns=tuple(str(p) for p in patterns),
        hub_threshold=threshold,
        actor=actor,
        created_at=created_at,
    )
