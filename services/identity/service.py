"""The identity service's use cases: each runs the graph inside one store transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import NotFound
from services.common.keyring import Keyring
from services.common.times import utc, utc_now
from services.identity import graph
from services.identity.graph import ItemInput, ItemResult, MergeRecord
from services.identity.rules import MergeRules
from services.identity.store import IdentityStore

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class LinkedIdentifierView:
    type: int
    namespace: str
    hashed_value: str
    sources: list[str]
    first_seen: datetime
    last_seen: datetime
    quarantined: bool


@dataclass(frozen=True, slots=True)
class PersonView:
    person_id: str
    created_at: datetime
    identifiers: list[LinkedIdentifierView]
    alias_person_ids: list[str]


@dataclass(frozen=True, slots=True)
class HistoryView:
    id: str
    kind: int
    at: datetime
    actor: str
    source: str
    person_ids: list[str]
    evidence: list[tuple[int, str]]
    rules_version: int
    reason: str
    merge_id: str


@dataclass(frozen=True, slots=True)
class ForgetResult:
    person_id: str
    alias_person_ids: list[str]
    identifiers_deleted: int


class IdentityService:
    """Resolve, merge, unmerge, forget and the rules, over one identity store."""

    def __init__(self, store: IdentityStore, keyring: Keyring, clock: Clock = utc_now) -> None:
        self.store = store
        self.keyring = keyring
        self.clock = clock
        self._rules_lock = threading.Lock()
        self._rules: MergeRules | None = None
        self._blocked_digests: frozenset[str] = frozenset()

    # Rules ---------------------------------------------------------------------------------------

    @property
    def rules(self) -> MergeRules:
        """The current rules (the built-in defaults, version 0, until PutRules is called)."""
        with self._rules_lock:
            if self._rules is None:
                self._set_rules(self.store.rules() or MergeRules())
            assert self._rules is not None
            return self._rules

    def _set_rules(self, rules: MergeRules) -> None:
        self._rules = rules
        self._blocked_digests = frozenset(
            digest
            for message in rules.blocked_messages()
            for digest in self.keyring.candidate_digests(message)
        )

    def put_rules(self, rules: MergeRules, actor: str) -> MergeRules:
        stored = self.store.put_rules(rules, actor, self.clock())
        with self._rules_lock:
            self._set_rules(stored)
        return stored

    def get_rules(self, version: int = 0) -> MergeRules:
        if version == 0:
            return self.rules
        rules = self.store.rules(version)
        if rules is None:
            raise NotFound("rules", str(version))
        return rules

    def is_blocked_digest(self, digest: str) -> bool:
        return digest in self._blocked_digests

    # Graph ---------------------------------------------------------------------------------------

    def resolve(self, items: Sequence[ItemInput]) -> list[ItemResult]:
        rules = self.rules
        with self.store.writing() as transaction:
            resolver = graph.Resolver(
                transaction, rules, self.clock(), blocked_digest=self.is_blocked_digest
            )
            return resolver.run(items)

    def lookup(self, candidates: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
        """(person_id or "", current digest) for each identifier's candidate digests."""
        with self.store.reading() as reader:
            known = reader.known_identifiers(d for group in candidates for d in group)
            roots = reader.roots_of(k.origin for k in known.values())
        answers = []
        for group in candidates:
            match = next((known[d] for d in group if d in known), None)
            person = "" if match is None else roots.get(match.origin, "")
            answers.append((person, group[0] if group else ""))
        return answers

    def person(self, person_id: str) -> PersonView:
        """A person (an alias answers with its root) with every identifier in hashed form."""
        with self.store.reading() as reader:
            view = reader.person_view(person_id)
        if view is None:
            raise NotFound("person", person_id)
        root, created_at, aliases, rows, sources = view
        return PersonView(
            root,
            created_at,
            [
                LinkedIdentifierView(
                    row.type,
                    row.namespace,
                    row.digest,
                    sorted(sources.get(row.id, [])),
                    utc(row.first_seen),
                    utc(row.last_seen),
                    bool(row.quarantined),
                )
                for row in sorted(rows, key=lambda r: r.id)
            ],
            aliases,
        )

    def history(
        self, person_id: str, limit: int, after: tuple[datetime, str] | None
    ) -> list[HistoryView]:
        """Merges, unmerges, refusals and quarantines of a person and its aliases, newest first."""
        with self.store.reading() as reader:
            if not reader.roots_of([person_id]):
                raise NotFound("person", person_id)
            page = reader.history_page(person_id, limit, after)
        return [
            HistoryView(
                entry.id,
                entry.kind,
                utc(entry.at),
                entry.actor,
                entry.source,
                people,
                [(int(t), str(d)) for t, d in entry.evidence],
                entry.rules_version,
                entry.reason,
                entry.merge_id,
            )
            for entry, people in page
        ]

    def merge(self, person_ids: Sequence[str], actor: str, reason: str) -> MergeRecord:
        rules = self.rules
        with self.store.writing() as transaction:
            return graph.merge_persons(
                transaction, person_ids, actor=actor, reason=reason, rules=rules, now=self.clock()
            )

    def unmerge(self, merge_id: str, actor: str, reason: str) -> tuple[MergeRecord, list[str]]:
        with self.store.writing() as transaction:
            return graph.unmerge(
                transaction, merge_id, actor=actor, reason=reason, now=self.clock()
            )

    def forget(self, person_id: str, reason: str) -> ForgetResult:
        with self.store.writing() as transaction:
            forgotten = transaction.forget(person_id, reason)
        if forgotten is None:
            raise NotFound("person", person_id)
        self.store.settle_forgotten()
        root, aliases, count = forgotten
        return ForgetResult(root, aliases, count)
