"""What recommend knows about each person right now, kept in memory: the `personalisation`
grant as last heard and the stored interactions.

A Recommend request needs exactly this, and reading it from the database cost more than
computing the answer. The view is loaded once (`load`), then kept exact by the writers: every
transaction that changes a person's grant or interactions calls `writing(connection, persons)`
before it commits. From then until the connection goes back to the pool (after its commit or
rollback) those persons are read from the database, as before; afterwards their record is read
again on the next request. A read only fills the view when no write to that person started or
ended while it ran (a generation per person), so the view never keeps a state older than the
database's committed one. Whatever the view cannot vouch for is read from the database, so a
view that was never loaded or missed a write costs speed, never correctness.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import numpy as np
from sqlalchemy import bindparam, event, select
from sqlalchemy.engine import Connection, Engine

from services.common.times import utc
from services.recommend.models.base import FloatArray
from services.recommend.store import consents_table, interactions_table

logger = logging.getLogger(__name__)

_PENDING: Final = "steward_recommend_people_written"

_COLUMNS: Final = (
    consents_table.c.person_id,
    consents_table.c.allowed,
    consents_table.c.expires_at,
    interactions_table.c.item_id,
    interactions_table.c.weight,
    interactions_table.c.occurred_at,
    interactions_table.c.event_type,
)
_JOINED: Final = consents_table.outerjoin(
    interactions_table, interactions_table.c.person_id == consents_table.c.person_id
)
# A person's grant and interactions in one round trip (no grant row: no rows at all).
_ONE_PERSON: Final = (
    select(*_COLUMNS).select_from(_JOINED).where(consents_table.c.person_id == bindparam("person"))
)
_EVERYONE: Final = select(*_COLUMNS).select_from(_JOINED).order_by(consents_table.c.person_id)


@dataclass(frozen=True, slots=True, eq=False)
class PersonRecord:
    """One person's grant and interactions (item ids, undecayed weights, times in epoch
    seconds, event types), in storage order."""

    allowed: bool
    expires_at: datetime | None
    item_ids: tuple[str, ...]
    weights: FloatArray
    times: FloatArray
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.item_ids)


def _record(rows: Sequence[Any]) -> PersonRecord | None:
    """The record of one person's joined rows (`_COLUMNS` order); None without a grant row."""
    if not rows:
        return None
    first = rows[0]
    events = [row for row in rows if row[3] is not None]
    return PersonRecord(
        allowed=bool(first[1]),
        expires_at=None if first[2] is None else utc(first[2]),
        item_ids=tuple(_interned(row[3]) for row in events),
        weights=np.array([row[4] for row in events], dtype=np.float64),
        times=np.array([utc(row[5]).timestamp() for row in events], dtype=np.float64),
        kinds=tuple(_interned(row[6]) for row in events),
    )


def _interned(value: str) -> str:
    """Item ids and event types repeat across a million rows: keep one copy of each."""
    return _INTERNED.setdefault(value, value)


_INTERNED: dict[str, str] = {}


class PersonView:
    """The grant and interactions of every person, exact with respect to committed writes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._records: dict[str, PersonRecord | None] = {}
        self._complete = False
        self._stale: set[str] = set()
        self._writing: dict[str, int] = {}
        self._generation: dict[str, int] = {}
        self._closed = False
        event.listen(engine.pool, "checkin", self._checked_in)

    @property
    def loaded(self) -> bool:
        return self._complete

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._records.clear()
            self._complete = False
        event.remove(self._engine.pool, "checkin", self._checked_in)

    # Writers -------------------------------------------------------------------------------------

    def writing(self, connection: Connection, persons: Iterable[str]) -> None:
        """The connection's transaction changes these persons: read them from the database
        until it has ended, and afresh after that."""
        touched = {person for person in persons if person}
        if not touched:
            return
        proxied = connection.connection
        info = proxied.record_info if proxied.record_info is not None else proxied.info
        pending: set[str] = info.setdefault(_PENDING, set())
        with self._lock:
            for person in touched - pending:
                self._writing[person] = self._writing.get(person, 0) + 1
            for person in touched:
                self._generation[person] = self._generation.get(person, 0) + 1
                self._records.pop(person, None)
                self._stale.add(person)
        pending |= touched

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        pending = record.record_info.pop(_PENDING, None) if record.record_info else None
        if pending is None and record.info:
            pending = record.info.pop(_PENDING, None)
        if not pending:
            return
        with self._lock:
            for person in pending:
                left = self._writing.get(person, 0) - 1
                if left > 0:
                    self._writing[person] = left
                else:
                    self._writing.pop(person, None)
                self._generation[person] = self._generation.get(person, 0) + 1

    # Readers -------------------------------------------------------------------------------------

    def get(self, person_id: str) -> PersonRecord | None:
        """The person's grant and interactions as committed (None: no grant row)."""
        with self._lock:
            if person_id not in self._writing:
                record = self._records.get(person_id, _MISSING)
                if record is not _MISSING:
                    return record  # type: ignore[return-value]
                if self._complete and person_id not in self._stale:
                    return None
            generation = self._generation.get(person_id, 0)
        with self._engine.connect() as connection:
            rows = connection.execute(_ONE_PERSON, {"person": person_id}).all()
        record = _record(rows)
        with self._lock:
            if (
                not self._closed
                and person_id not in self._writing
                and self._generation.get(person_id, 0) == generation
            ):
                self._records[person_id] = record
                self._stale.discard(person_id)
        return record

    def load(self) -> int:
        """Read every person at once (one consistent statement); returns how many were read.

        Persons written while it ran stay to be read singly.
        """
        with self._lock:
            before = dict(self._generation)
        loaded: dict[str, PersonRecord | None] = {}
        with self._engine.connect() as connection:
            result = connection.execution_options(yield_per=20_000).execute(_EVERYONE)
            person: str | None = None
            rows: list[Any] = []
            for row in result:
                if row[0] != person:
                    if person is not None:
                        loaded[person] = _record(rows)
                    person, rows = row[0], []
                rows.append(row)
            if person is not None:
                loaded[person] = _record(rows)
        with self._lock:
            if self._closed:
                return 0
            changed = {
                person
                for person, generation in self._generation.items()
                if before.get(person, 0) != generation
            } | set(self._writing)
            for person, record in loaded.items():
                if person not in changed:
                    self._records[person] = record
            self._stale = changed
            self._complete = True
        return len(loaded)


_MISSING: Final = object()
