"""What CheckConsent reads, held in memory for the persons asked about recently.

CheckConsent is the suite's most frequent call. Reading a person's decisions from the database
costs little on its own (about 30 µs on SQLite), but every driver call releases the interpreter
lock, and with the gRPC server's threads all wanting it back the hand-offs cost several times
the read: on a server answering 2,000 checks a second, 450-550 µs of CPU per call with the read
against about 320 µs without it. So the answer's inputs are kept: per person, its group's
decisions by purpose (decisions never change once written) and, when needed, whether the person
was erased. The effective state is still computed at each call, at the moment asked about, so
expiry needs no invalidation.

Keeping it right: consent's own process is the only writer of decisions, person links and
erasures (one consent process per database, as ``steward serve`` and compose run it). Every
transaction that may change them calls :meth:`ConsentCheckCache.changed` after it commits,
dropping the persons it names (a decision's whole group) or everything (a merge, an unmerge, an
erasure, a purpose). A reader notes :attr:`ConsentCheckCache.generation` before it reads and
keeps what it read only if no change was reported since: a read that saw the state before a
commit is either dropped by the change that follows the commit or refused when it is offered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from services.consent.decisions import DecisionRecord

CAPACITY: Final = 100_000
"""Persons held (a few hundred bytes each with four decisions)."""


@dataclass(frozen=True, slots=True)
class CheckInputs:
    """A person's group's decisions by purpose, in ledger order, and whether the person is
    erased (None: not looked up yet; only asked when a purpose has no decision)."""

    decisions: Mapping[str, tuple[DecisionRecord, ...]]
    erased: bool | None = None

    def with_erased(self, erased: bool) -> CheckInputs:
        return replace(self, erased=erased)


def by_purpose(decisions: Iterable[DecisionRecord]) -> dict[str, tuple[DecisionRecord, ...]]:
    grouped: dict[str, list[DecisionRecord]] = {}
    for decision in decisions:
        grouped.setdefault(decision.purpose, []).append(decision)
    return {purpose: tuple(listed) for purpose, listed in grouped.items()}


class ConsentCheckCache:
    """A bounded LRU map from person ids to their :class:`CheckInputs`. Thread-safe."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the capacity must be at least 1")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CheckInputs] = OrderedDict()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Note this before reading what :meth:`offer` will be given."""
        return self._generation

    def get(self, person: str) -> CheckInputs | None:
        with self._lock:
            found = self._entries.get(person)
            if found is not None:
                self._entries.move_to_end(person)
            return found

    def offer(self, person: str, inputs: CheckInputs, generation: int) -> bool:
        """Keep ``inputs``, read after :attr:`generation` was ``generation``, unless a change
        was reported since; returns whether they were kept."""
        with self._lock:
            if generation != self._generation:
                return False
            self._entries[person] = inputs
            self._entries.move_to_end(person)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return True

    def changed(self, persons: Iterable[str] | None = None) -> None:
        """A committed transaction changed what ``persons`` (None: anyone) check against."""
        with self._lock:
            self._generation += 1
            if persons is None:
                self._entries.clear()
                return
            for person in persons:
                self._entries.pop(person, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
