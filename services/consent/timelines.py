"""The consent timelines of persons Collect saw recently, kept in step with their decisions.

Collect needs every decision of every person in a batch, and reading them all again for each
batch was its costliest step (four rows a person, each made into a record, then eight consent
states an event). Decisions never change once written, so a batch reads only the decisions
recorded since the previous one, by ledger seq, and those of persons not held yet. Ledger seqs
follow commit order on both backends (appends are serialised by the ledger head), so a read
that sees a seq sees every seq before it: nothing recorded in between is missed, by this
process or another one writing to the same database.

Erasure deletes decisions, which no seq shows: Collect drops erased persons before it asks for
their timelines, and :meth:`ConsentTimelines.forget` lets go of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from sqlalchemy.engine import Connection

from services.consent.collect import ConsentTimeline
from services.consent.decisions import DecisionRecord
from services.consent.store import CollectionStore

CAPACITY: Final = 100_000
"""Persons held (a few hundred bytes each, with four decisions)."""
CATCH_UP_LIMIT: Final = 10_000
"""More decisions than this since the last batch: start afresh rather than apply them."""


class ConsentTimelines:
    """A bounded LRU map from person ids to their consent timelines. Thread-safe."""

    def __init__(
        self,
        store: CollectionStore,
        *,
        capacity: int = CAPACITY,
        catch_up_limit: int = CATCH_UP_LIMIT,
    ) -> None:
        self._store = store
        self._capacity = capacity
        self._catch_up_limit = catch_up_limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, ConsentTimeline] = OrderedDict()
        self._seq: int | None = None
        """Every entry holds every decision up to this seq (None: not started, no entries)."""

    def of(self, connection: Connection, persons: Iterable[str]) -> dict[str, ConsentTimeline]:
        """The timelines of ``persons``, complete as of the caller's transaction (or later)."""
        wanted = list(dict.fromkeys(persons))
        seen = self._catch_up(connection)
        found: dict[str, ConsentTimeline] = {}
        with self._lock:
            entries = self._entries
            for person in wanted:
                timeline = entries.get(person)
                if timeline is not None:
                    entries.move_to_end(person)
                    found[person] = timeline
        missing = [person for person in wanted if person not in found]
        if missing:
            decisions = self._store.decisions_of_many(connection, missing)
            fresh = {person: ConsentTimeline(decisions.get(person, ())) for person in missing}
            found.update(fresh)
            with self._lock:
                # Only when nobody caught up past what this transaction has seen: else the
                # decisions read here could lack some that the catching up did not apply.
                if self._seq == seen:
                    self._entries.update(fresh)
                    while len(self._entries) > self._capacity:
                        self._entries.popitem(last=False)
        return found

    def forget(self, persons: Iterable[str]) -> None:
        with self._lock:
            for person in persons:
                self._entries.pop(person, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _catch_up(self, connection: Connection) -> int:
        """Apply the decisions recorded since the last call; returns the seq this call saw."""
        with self._lock:
            seq = self._seq
        if seq is None:
            return self._restart(connection)
        later = self._store.decisions_after(connection, seq, self._catch_up_limit + 1)
        if not later:
            return seq
        if len(later) > self._catch_up_limit:
            return self._restart(connection)
        by_person: dict[str, list[DecisionRecord]] = {}
        for decision in later:
            by_person.setdefault(decision.person_id, []).append(decision)
        seen = later[-1].seq
        with self._lock:
            for person, decisions in by_person.items():
                timeline = self._entries.get(person)
                if timeline is not None:
                    self._entries[person] = timeline.with_decisions(decisions)
            if self._seq is not None and seen > self._seq:
                self._seq = seen
        return seen

    def _restart(self, connection: Connection) -> int:
        last = self._store.last_decision_seq(connection)
        with self._lock:
            self._entries.clear()
            self._seq = last
        return last
