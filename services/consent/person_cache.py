"""Identifier sets already resolved to persons, so most Collect batches skip identity's Resolve.

Invalidated by identity's own event log: a merge, unmerge or forget drops every entry naming the
persons concerned, so the next batch asks identity again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Final

from sqlalchemy.engine import Connection
from steward.events.v1 import events_pb2

from services.common.identifiers import PseudonymisedIdentifier

CAPACITY: Final = 200_000


def cache_key(identifiers: Sequence[PseudonymisedIdentifier]) -> tuple[str, ...]:
    return tuple(sorted(i.digest for i in identifiers if not i.blocked))


class PersonCache:
    """A bounded LRU map from identifier sets to person ids. Thread-safe.

    Each person's keys are indexed too, so a merge, unmerge or forget invalidates in time
    proportional to what it touches, not to the cache's size. An answer asked of identity before
    an invalidation may be stale by the time it arrives: :meth:`put` with the ``generation`` read
    before asking drops it then.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._keys_of: dict[str, set[tuple[str, ...]]] = {}
        self._generation = 0

    def get(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            person = self._entries.get(key)
            if person is not None:
                self._entries.move_to_end(key)
            return person

    def get_many(self, keys: Sequence[tuple[str, ...]]) -> list[str | None]:
        """``get`` of each key, under one acquisition of the lock (a Collect batch at once)."""
        with self._lock:
            entries = self._entries
            found = [entries.get(key) for key in keys]
            for key, person in zip(keys, found, strict=True):
                if person is not None:
                    entries.move_to_end(key)
            return found

    @property
    def generation(self) -> int:
        """Changes with every invalidation."""
        with self._lock:
            return self._generation

    def put(self, key: tuple[str, ...], person: str, generation: int | None = None) -> None:
        """Remember ``key``'s person, unless an invalidation came after ``generation``."""
        if not key or not person:
            return
        with self._lock:
            if generation is not None and generation != self._generation:
                return
            previous = self._entries.get(key)
            if previous is not None and previous != person:
                self._unindex(key, previous)
            self._entries[key] = person
            self._entries.move_to_end(key)
            self._keys_of.setdefault(person, set()).add(key)
            while len(self._entries) > self._capacity:
                oldest, owner = self._entries.popitem(last=False)
                self._unindex(oldest, owner)

    def invalidate(self, persons: Iterable[str]) -> int:
        removed = 0
        with self._lock:
            self._generation += 1
            for person in set(persons):
                for key in self._keys_of.pop(person, ()):
                    del self._entries[key]
                    removed += 1
        return removed

    def _unindex(self, key: tuple[str, ...], person: str) -> None:
        keys = self._keys_of.get(person)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of[person]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def apply(self, _connection: Connection, envelope: events_pb2.Envelope) -> None:
        """Consumer callback for identity's log: forget what a merge, unmerge or forget changed."""
        body = envelope.WhichOneof("body")
        if body == "persons_merged":
            merged = envelope.persons_merged
            self.invalidate([merged.surviving_person_id, *merged.absorbed_person_ids])
        elif body == "person_unmerged":
            split = envelope.person_unmerged
            self.invalidate([split.surviving_person_id, split.restored_person_id])
        elif body == "person_forgotten":
            forgotten = envelope.person_forgotten
            self.invalidate([forgotten.person_id, *forgotten.alias_person_ids])
