"""The identity graph: resolving identifier sets to persons, merging and unmerging them.

Model. Every identifier belongs to exactly one *origin* person: the person in whose name it
came. A merge never moves identifiers; it makes the absorbed persons *aliases* of the survivor
(``alias_of``), and every person carries the *root* it resolves to. Unmerge clears ``alias_of``
and recomputes roots, so the absorbed person comes back with exactly its own identifiers —
including those it gained later in its own name — while later merges stay as they are.

Resolve takes identifiers in priority order and grows one group of persons, refusing any
identifier whose person (or whose own addition) would break a per-person limit: the
lowest-priority conflicting identifiers are the ones refused. When the strongest identifier of
an item is new and only weaker identifiers are known (a new email arriving with a known cookie),
the new identifiers form a person of their own that is merged into the group, so the join is a
merge with evidence that can be undone. Identifiers that keep appearing with otherwise distinct
persons (a shared tablet, a call-centre number) are quarantined as hubs, and every merge that
only they supported is undone.

Everything here is plain Python over a :class:`GraphTransaction` supplied by the store.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeAlias

from steward.identity.v1 import identity_pb2

from services.common.errors import FailedPrecondition, NotFound
from services.common.identifiers import IdentifierType
from services.identity.rules import MergeRules, TypeLimit, describe_limit

LinkStatus: TypeAlias = identity_pb2.LinkStatus.ValueType
HistoryKind: TypeAlias = identity_pb2.HistoryKind.ValueType
L = identity_pb2

RESOLVE_ACTOR = "resolve"
QUARANTINE_ACTOR = "quarantine"


def new_person_id() -> str:
    """A random person id: it derives from nothing about the person."""
    return f"p_{secrets.token_hex(16)}"


def new_record_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# Inputs and outputs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentifierInput:
    """One identifier of a Resolve item, already pseudonymised (or refused) at the edge."""

    index: int
    type: IdentifierType
    namespace: str
    digest: str = ""
    candidates: tuple[str, ...] = ()
    invalid: str = ""
    """Why the identifier could not be normalised; empty when it could."""
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class ItemInput:
    index: int
    identifiers: tuple[IdentifierInput, ...]
    source: str
    seen_at: datetime


@dataclass(slots=True)
class IdentifierOutcome:
    index: int
    type: IdentifierType
    hashed_value: str
    status: LinkStatus
    detail: str = ""


@dataclass(slots=True)
class ItemResult:
    index: int
    person_id: str = ""
    created: bool = False
    merged_person_ids: list[str] = field(default_factory=list)
    merge_id: str = ""
    identifiers: list[IdentifierOutcome] = field(default_factory=list)


# What the store provides -----------------------------------------------------------------------


@dataclass(slots=True)
class KnownIdentifier:
    """An identifier already in the graph."""

    id: int
    digest: str
    type: IdentifierType
    namespace: str
    origin: str
    quarantined: bool
    sources: set[str]


@dataclass(slots=True)
class PersonGroup:
    """A root person with its aliases and every identifier they hold."""

    root: str
    created_at: datetime
    members: set[str]
    held: dict[str, tuple[IdentifierType, str, frozenset[str]]]
    """digest -> (type, namespace, sources) of every identifier of the group."""


@dataclass(frozen=True, slots=True)
class Evidence:
    digest: str
    type: IdentifierType
    side: str
    """The person the identifier stood for when it joined the merge."""


@dataclass(frozen=True, slots=True)
class MergeRecord:
    merge_id: str
    survivor: str
    absorbed: tuple[str, ...]
    actor: str
    source: str
    reason: str
    rules_version: int
    merged_at: datetime
    evidence: tuple[Evidence, ...] = ()
    undone_at: datetime | None = None
    attach: tuple[tuple[str, str], ...] = ()
    """(absorbed person, the person it becomes an alias of); the survivor when not named."""

    def attach_point(self, absorbed: str) -> str:
        return dict(self.attach).get(absorbed, self.survivor)


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    kind: HistoryKind
    at: datetime
    actor: str
    source: str
    person_ids: tuple[str, ...]
    evidence: tuple[tuple[IdentifierType, str], ...]
    rules_version: int
    reason: str
    merge_id: str = ""


@dataclass(frozen=True, slots=True)
class NewIdentifier:
    digest: str
    type: IdentifierType
    namespace: str
    origin: str
    source: str
    seen_at: datetime


class GraphTransaction(Protocol):
    """One database transaction of the identity store, holding the graph's write lock."""

    def known_with_roots(
        self, digests: Iterable[str]
    ) -> tuple[dict[str, KnownIdentifier], dict[str, str]]:
        """The known identifiers among ``digests``, and origin person -> root for each."""
        ...

    def known_identifiers(self, digests: Iterable[str]) -> dict[str, KnownIdentifier]: ...

    def groups(self, roots: Iterable[str]) -> dict[str, PersonGroup]: ...

    def roots_of(self, persons: Iterable[str]) -> dict[str, str]: ...

    def copresence(self, identifier_ids: Iterable[int]) -> dict[int, set[str]]: ...

    def create_persons(self, persons: Sequence[tuple[str, datetime]]) -> None: ...

    def link_identifiers(self, identifiers: Sequence[NewIdentifier]) -> dict[str, int]: ...

    def touch_identifiers(self, seen: dict[int, tuple[datetime, set[str]]]) -> None: ...

    def relink_digest(self, identifier_id: int, new_digest: str) -> None: ...

    def record_copresence(self, observations: set[tuple[int, str]], at: datetime) -> None: ...

    def quarantine(self, identifier_id: int) -> KnownIdentifier:
        """Mark an identifier as a hub; returns it."""
        ...

    def apply_merges(self, merges: Sequence[MergeRecord]) -> None:
        """In order, make each merge's absorbed persons aliases; record and publish the merges."""
        ...

    def merges_supported_by(self, identifier_id: int) -> list[MergeRecord]: ...

    def quarantined_digests(self, digests: Iterable[str]) -> set[str]: ...

    def merge(self, merge_id: str) -> MergeRecord | None: ...

    def undo_merge(self, merge: MergeRecord, at: datetime, actor: str, reason: str) -> list[str]:
        """Clear ``alias_of`` of the absorbed persons, recompute roots, publish; returns them."""
        ...

    def add_history(self, entries: Sequence[HistoryRecord]) -> None: ...


# Resolve ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """Writes of the items processed so far, applied in bulk."""

    persons: list[tuple[str, datetime]] = field(default_factory=list)
    identifiers: list[NewIdentifier] = field(default_factory=list)
    touched: dict[str, tuple[datetime, set[str]]] = field(default_factory=dict)
    copresence: set[tuple[str, str]] = field(default_factory=set)
    merges: list[MergeRecord] = field(default_factory=list)
    history: list[HistoryRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.persons
            or self.identifiers
            or self.touched
            or self.copresence
            or self.merges
            or self.history
        )


class Resolver:
    """Resolves one batch inside one transaction."""

    def __init__(
        self,
        transaction: GraphTransaction,
        rules: MergeRules,
        now: datetime,
        *,
        blocked_digest: Callable[[str], bool],
    ) -> None:
        self._tx = transaction
        self._rules = rules
        self._now = now
        self._blocked_digest = blocked_digest
        self._known: dict[str, KnownIdentifier] = {}
        self._ids: dict[int, KnownIdentifier] = {}
        self._root: dict[str, str] = {}
        self._groups: dict[str, PersonGroup] = {}
        self._copresence: dict[str, set[str]] = {}
        """digest -> persons it was seen with; by digest, as identifiers linked in this batch
        have no row id yet."""
        self._pending = _Pending()
        self._new_copresence: dict[str, set[str]] = {}

    # Loading ---------------------------------------------------------------------------------

    def _load(self, items: Sequence[ItemInput]) -> None:
        digests = {c for item in items for ident in item.identifiers for c in ident.candidates}
        self._known, self._root = self._tx.known_with_roots(digests)
        self._ids = {known.id: known for known in self._known.values()}
        self._groups = self._tx.groups(self._roots_to_load(items))
        for group in self._groups.values():
            for member in group.members:
                self._root[member] = group.root
        self._copresence = {
            self._ids[identifier_id].digest: persons
            for identifier_id, persons in self._tx.copresence(self._ids).items()
        }
        self._new_copresence = {}

    def _roots_to_load(self, items: Sequence[ItemInput]) -> set[str]:
        """Roots whose whole group some item may need: for limits, links or a merge.

        An item whose identifiers are all known and resolve to one person needs none of it, and
        that is most of a shop's traffic. ``_group`` loads any group missed here on demand.
        """
        needed: set[str] = set()
        for item in items:
            roots: set[str] = set()
            gains = False
            for ident in item.identifiers:
                if ident.invalid or ident.blocked or self._blocked_digest(ident.digest):
                    continue
                known = next((self._known[c] for c in ident.candidates if c in self._known), None)
                if known is None:
                    gains = True
                elif not known.quarantined:
                    roots.add(self._root[known.origin])
            if gains or len(roots) > 1:
                needed |= roots
        return needed

    def _group(self, root: str) -> PersonGroup:
        group = self._groups.get(root)
        if group is None:
            # Not among the roots loaded for the batch, so unchanged here but for new sources.
            group = self._groups[root] = self._tx.groups([root])[root]
            for digest, (type_, namespace, sources) in list(group.held.items()):
                touched = self._pending.touched.get(digest)
                if touched is not None:
                    group.held[digest] = (type_, namespace, sources | touched[1])
            for member in group.members:
                self._root[member] = root
        return group

    def run(self, items: Sequence[ItemInput]) -> list[ItemResult]:
        self._load(items)
        results = []
        for position, item in enumerate(items):
            while True:
                result, hubs = self._resolve_item(item)
                if not hubs:
                    break
                # A hub surfaced: write what came before, undo what the hub joined, reload.
                self._flush()
                for digest in hubs:
                    quarantine_hub(self._tx, self._known[digest].id, self._now, self._rules)
                self._load(items[position:])
            results.append(result)
        self._flush()
        return results

    # One item --------------------------------------------------------------------------------

    def _known_for(self, ident: IdentifierInput) -> KnownIdentifier | None:
        for candidate in ident.candidates:
            known = self._known.get(candidate)
            if known is not None:
                if known.digest != ident.digest and ident.digest == ident.candidates[0]:
                    # Found under an older key: re-link it under the current one.
                    self._tx.relink_digest(known.id, ident.digest)
                    del self._known[known.digest]
                    known.digest = ident.digest
                    self._known[ident.digest] = known
                return known
        return None

    def _resolve_item(self, item: ItemInput) -> tuple[ItemResult, list[str]]:
        rules = self._rules
        result = ItemResult(item.index)
        outcomes: dict[int, IdentifierOutcome] = {}
        active: list[tuple[IdentifierInput, KnownIdentifier | None]] = []
        seen_digests: set[str] = set()
        for ident in item.identifiers:
            outcome = IdentifierOutcome(
                ident.index, ident.type, ident.digest, L.LINK_STATUS_UNSPECIFIED
            )
            outcomes[ident.index] = outcome
            if ident.invalid:
                outcome.status, outcome.detail = L.LINK_STATUS_INVALID, ident.invalid
                continue
            if ident.blocked or self._blocked_digest(ident.digest):
                outcome.status, outcome.detail = L.LINK_STATUS_BLOCKED, "blocklist"
                continue
            if ident.digest in seen_digests:
                outcome.status, outcome.detail = L.LINK_STATUS_ALREADY_KNOWN, "repeated in item"
                continue
            seen_digests.add(ident.digest)
            known = self._known_for(ident)
            if known is not None:
                self._touch(known, item)
                if known.quarantined:
                    outcome.status, outcome.detail = L.LINK_STATUS_QUARANTINED, "hub identifier"
                    continue
            active.append((ident, known))
        if len(active) == len(outcomes) and self._one_known_person(active):
            # A returning person (most of a shop's traffic): every identifier is known and
            # resolves to one person, so nothing links, merges, breaks a limit or counts
            # towards a hub.
            for outcome in outcomes.values():
                outcome.status = L.LINK_STATUS_ALREADY_KNOWN
            result.person_id = self._root[active[0][1].origin]  # type: ignore[union-attr]
            result.identifiers = list(outcomes.values())
            return result, []
        active.sort(key=lambda pair: (rules.rank(pair[0].type), pair[0].index))

        group: list[str] = []
        gained: list[tuple[IdentifierType, str, frozenset[str]]] = []
        pending: list[IdentifierInput] = []
        joined: list[tuple[IdentifierInput, KnownIdentifier]] = []
        refused: list[tuple[IdentifierInput, TypeLimit]] = []
        for ident, known in active:
            outcome = outcomes[ident.index]
            if known is None:
                held = self._held(group, gained)
                entry = (ident.type, ident.namespace, frozenset({item.source}))
                broken = _new_violation(rules, [*held, entry], [held])
                if broken is None:
                    pending.append(ident)
                    gained.append(entry)
                    outcome.status = L.LINK_STATUS_LINKED
                else:
                    refused.append((ident, broken))
                    outcome.status, outcome.detail = (
                        L.LINK_STATUS_REJECTED_LIMIT,
                        describe_limit(broken),
                    )
                continue
            root = self._root[known.origin]
            if root in group:
                joined.append((ident, known))
                outcome.status = L.LINK_STATUS_ALREADY_KNOWN
                continue
            broken = None
            if group or gained:
                # (The first person joined cannot break a limit it does not already break.)
                held = self._held(group, gained)
                theirs = list(self._group(root).held.values())
                broken = _new_violation(rules, held + theirs, [held, theirs])
            if broken is None:
                group.append(root)
                joined.append((ident, known))
                outcome.status = L.LINK_STATUS_ALREADY_KNOWN
            else:
                refused.append((ident, broken))
                outcome.status, outcome.detail = (
                    L.LINK_STATUS_REJECTED_LIMIT,
                    describe_limit(broken),
                )

        strongest_known = min(
            (rules.rank(i.type) for i, _ in joined), default=len(rules.priority) + 1
        )
        strongest_new = min((rules.rank(i.type) for i in pending), default=len(rules.priority) + 1)
        new_person = ""
        if pending and (not group or strongest_new < strongest_known):
            new_person = new_person_id()

        # Hub accounting: which otherwise distinct persons did each known identifier appear with?
        hubs: list[str] = []
        considered = [(i, k) for i, k in active if k is not None]
        for ident, known in considered:
            own_root = self._root[known.origin]
            others = {
                self._root[k.origin] for i, k in considered if k is not None and i is not ident
            }
            others.discard(own_root)
            if new_person and strongest_new < rules.rank(ident.type):
                others.add(new_person)
            if not others:
                continue
            observed = self._copresence.setdefault(known.digest, set())
            fresh = others - observed
            if not fresh:
                continue
            observed |= fresh
            self._new_copresence.setdefault(known.digest, set()).update(fresh)
            if len(observed) > rules.hub_threshold:
                hubs.append(known.digest)
        if hubs:
            for digest in hubs:
                self._known[digest].quarantined = True
            # Observations stay recorded; the item is resolved again without the hubs.
            return result, hubs

        if not group and not pending:
            result.identifiers = [outcomes[i.index] for i in item.identifiers]
            self._record_refusals(item, result, refused)
            return result, []

        survivor = ""
        absorbed: list[str] = []
        if new_person:
            self._create_person(new_person, pending, item)
        if group:
            survivor = group[0]
            if len(group) > 1:
                survivor = min(group, key=lambda root: (self._group(root).created_at, root))
            absorbed = [root for root in group if root != survivor]
            if new_person:
                absorbed.append(new_person)
            if not new_person and pending:
                # Gained in the name of the person of the strongest known identifier.
                origin = joined[0][1].origin
                self._link(pending, origin, item)
        else:
            survivor = new_person

        if absorbed:
            evidence = [Evidence(k.digest, k.type, self._root[k.origin]) for _, k in joined]
            if new_person:
                evidence += [Evidence(i.digest, i.type, new_person) for i in pending]
            # Absorbed persons hang off the person whose identifier joined them, not the root,
            # so undoing an earlier merge of that person takes them along.
            attach_point = next(k.origin for _, k in joined if self._root[k.origin] == survivor)
            merge = MergeRecord(
                merge_id=new_record_id("m"),
                survivor=survivor,
                absorbed=tuple(absorbed),
                actor=RESOLVE_ACTOR,
                source=item.source,
                reason="identifiers presented together",
                rules_version=rules.version,
                merged_at=self._now,
                evidence=tuple(evidence),
                attach=tuple((person, attach_point) for person in absorbed),
            )
            self._merge_in_memory(merge)
            self._pending.merges.append(merge)
            result.merge_id = merge.merge_id
            result.merged_person_ids = absorbed
        result.person_id = survivor
        result.created = survivor == new_person
        result.identifiers = [outcomes[i.index] for i in item.identifiers]
        self._record_refusals(item, result, refused)
        return result, []

    def _one_known_person(
        self, active: list[tuple[IdentifierInput, KnownIdentifier | None]]
    ) -> bool:
        root = ""
        for _, known in active:
            if known is None:
                return False
            own = self._root[known.origin]
            if root and own != root:
                return False
            root = own
        return bool(root)

    def _held(
        self, roots: list[str], gained: list[tuple[IdentifierType, str, frozenset[str]]]
    ) -> list[tuple[IdentifierType, str, frozenset[str]]]:
        """(type, namespace, sources) of everything the persons ``roots`` hold, and ``gained``."""
        return [entry for root in roots for entry in self._group(root).held.values()] + gained

    def _record_refusals(
        self, item: ItemInput, result: ItemResult, refused: list[tuple[IdentifierInput, TypeLimit]]
    ) -> None:
        blocked = [o for o in result.identifiers if o.status == L.LINK_STATUS_BLOCKED]
        if not refused and not blocked:
            return
        reasons = sorted({describe_limit(limit) for _, limit in refused})
        if blocked:
            reasons.append("blocklist")
        evidence = [(i.type, i.digest) for i, _ in refused]
        evidence += [(o.type, o.hashed_value) for o in blocked if o.hashed_value]
        self._pending.history.append(
            HistoryRecord(
                kind=L.HISTORY_KIND_REFUSAL,
                at=self._now,
                actor=RESOLVE_ACTOR,
                source=item.source,
                person_ids=(result.person_id,) if result.person_id else (),
                evidence=tuple(evidence),
                rules_version=self._rules.version,
                reason="; ".join(reasons),
            )
        )

    # In-memory bookkeeping -------------------------------------------------------------------

    def _touch(self, known: KnownIdentifier, item: ItemInput) -> None:
        at, sources = self._pending.touched.get(known.digest, (item.seen_at, set()))
        if item.source not in known.sources:
            sources.add(item.source)
            known.sources.add(item.source)
            root = self._root.get(known.origin)
            group = self._groups.get(root) if root else None
            if group is not None and known.digest in group.held:
                type_, namespace, held_sources = group.held[known.digest]
                group.held[known.digest] = (type_, namespace, held_sources | {item.source})
        self._pending.touched[known.digest] = (max(at, item.seen_at), sources)

    def _create_person(self, person: str, pending: list[IdentifierInput], item: ItemInput) -> None:
        self._pending.persons.append((person, self._now))
        self._root[person] = person
        self._groups[person] = PersonGroup(person, self._now, {person}, {})
        self._link(pending, person, item)

    def _link(self, pending: list[IdentifierInput], origin: str, item: ItemInput) -> None:
        group = self._group(self._root[origin])
        for ident in pending:
            self._pending.identifiers.append(
                NewIdentifier(
                    ident.digest, ident.type, ident.namespace, origin, item.source, item.seen_at
                )
            )
            known = KnownIdentifier(
                0, ident.digest, ident.type, ident.namespace, origin, False, {item.source}
            )
            self._known[ident.digest] = known
            group.held[ident.digest] = (ident.type, ident.namespace, frozenset({item.source}))

    def _merge_in_memory(self, merge: MergeRecord) -> None:
        target = self._group(merge.survivor)
        for root in merge.absorbed:
            group = self._group(root)
            del self._groups[root]
            for member in group.members:
                self._root[member] = merge.survivor
            target.members |= group.members
            target.held.update(group.held)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = _Pending()
        self._tx.create_persons(pending.persons)
        new_ids = self._tx.link_identifiers(pending.identifiers)
        for digest, identifier_id in new_ids.items():
            known = self._known.get(digest)
            if known is not None:
                known.id = identifier_id
                self._ids[identifier_id] = known
        touched = {
            self._known[digest].id: value
            for digest, value in pending.touched.items()
            if digest in self._known and self._known[digest].id
        }
        self._tx.touch_identifiers(touched)
        self._tx.apply_merges(pending.merges)
        observations = {
            (self._known[digest].id, other)
            for digest, others in self._new_copresence.items()
            for other in others
            if self._known[digest].id
        }
        self._new_copresence = {}
        self._tx.record_copresence(observations, self._now)
        self._tx.add_history(pending.history)


def _new_violation(
    rules: MergeRules,
    candidate: list[tuple[IdentifierType, str, frozenset[str]]],
    parts: list[list[tuple[IdentifierType, str, frozenset[str]]]],
) -> TypeLimit | None:
    """The first limit ``candidate`` breaks that none of its ``parts`` broke on its own.

    Persons already over a limit (rules tightened later) keep what they hold; only a change
    that makes things worse is refused.
    """
    types = {type_ for type_, _, _ in candidate}
    for limit in rules.limits:
        if limit.type not in types:
            continue
        count = sum(limit.counts(t, ns, s) for t, ns, s in candidate)
        if count <= limit.max_per_person:
            continue
        before = max(
            (sum(limit.counts(t, ns, s) for t, ns, s in part) for part in parts), default=0
        )
        if count > before:
            return limit
    return None


# Quarantine, merge, unmerge ------------------------------------------------------------------


def quarantine_hub(
    transaction: GraphTransaction, identifier_id: int, now: datetime, rules: MergeRules
) -> list[str]:
    """Quarantine a hub identifier and undo every merge that only hubs supported.

    A merge is supported while each of its sides still has a non-quarantined identifier among
    the evidence that joined it. Returns the merge ids undone.
    """
    hub = transaction.quarantine(identifier_id)
    undone = []
    reason = "hub identifier quarantined"
    for merge in transaction.merges_supported_by(identifier_id):
        if merge.undone_at is not None:
            continue
        quarantined = transaction.quarantined_digests(e.digest for e in merge.evidence)
        supported = {e.side for e in merge.evidence if e.digest not in quarantined}
        if {merge.survivor, *merge.absorbed} <= supported:
            continue
        restored = transaction.undo_merge(merge, now, QUARANTINE_ACTOR, reason)
        undone.append(merge.merge_id)
        transaction.add_history([_unmerge_history(merge, restored, now, QUARANTINE_ACTOR, reason)])
    root = transaction.roots_of([hub.origin]).get(hub.origin, hub.origin)
    transaction.add_history(
        [
            HistoryRecord(
                kind=L.HISTORY_KIND_QUARANTINE,
                at=now,
                actor=QUARANTINE_ACTOR,
                source="",
                person_ids=(root,),
                evidence=((hub.type, hub.digest),),
                rules_version=rules.version,
                reason=f"presented with more than {rules.hub_threshold} otherwise distinct persons",
            )
        ]
    )
    return undone


def _unmerge_history(
    merge: MergeRecord, restored: Sequence[str], now: datetime, actor: str, reason: str
) -> HistoryRecord:
    return HistoryRecord(
        kind=L.HISTORY_KIND_UNMERGE,
        at=now,
        actor=actor,
        source=merge.source,
        person_ids=(merge.survivor, *restored),
        evidence=tuple((e.type, e.digest) for e in merge.evidence),
        rules_version=merge.rules_version,
        reason=reason,
        merge_id=merge.merge_id,
    )


def merge_persons(
    transaction: GraphTransaction,
    person_ids: Sequence[str],
    *,
    actor: str,
    reason: str,
    rules: MergeRules,
    now: datetime,
) -> MergeRecord:
    """An operator's merge of persons (aliases count as their root); the oldest survives.

    Refused when a person is unknown, when fewer than two distinct persons remain, or when the
    merged person would break a limit.
    """
    roots = transaction.roots_of(person_ids)
    missing = [p for p in person_ids if p not in roots]
    if missing:
        raise NotFound("person", missing[0])
    distinct = sorted(set(roots.values()))
    if len(distinct) < 2:
        raise FailedPrecondition([("MERGE", "persons", "the persons named are already one person")])
    groups = transaction.groups(distinct)
    held = [entry for root in distinct for entry in groups[root].held.values()]
    broken = _new_violation(rules, held, [list(groups[root].held.values()) for root in distinct])
    if broken is not None:
        raise FailedPrecondition(
            [("RULES", f"rules/{rules.version}", describe_limit(broken))],
            f"merging would break the {describe_limit(broken)}",
        )
    survivor = min(distinct, key=lambda root: (groups[root].created_at, root))
    merge = MergeRecord(
        merge_id=new_record_id("m"),
        survivor=survivor,
        absorbed=tuple(root for root in distinct if root != survivor),
        actor=actor,
        source="operator",
        reason=reason,
        rules_version=rules.version,
        merged_at=now,
    )
    transaction.apply_merges([merge])
    return merge


def unmerge(
    transaction: GraphTransaction, merge_id: str, *, actor: str, reason: str, now: datetime
) -> tuple[MergeRecord, list[str]]:
    """Undo one merge exactly; later merges stay. Returns the merge and the restored persons."""
    merge = transaction.merge(merge_id)
    if merge is None:
        raise NotFound("merge", merge_id)
    if merge.undone_at is not None:
        raise FailedPrecondition([("MERGE", f"merges/{merge_id}", "the merge was already undone")])
    restored = transaction.undo_merge(merge, now, actor, reason)
    transaction.add_history([_unmerge_history(merge, restored, now, actor, reason)])
    return merge, restored
