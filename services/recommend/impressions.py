"""Answers shown, written behind the request that made them.

Every Recommend answer is recorded (for feedback, per-arm statistics and the person's export),
but a commit per answer would cost more than computing the answer. The writer keeps the rows in
memory and inserts them in one transaction every ``interval`` seconds (or as soon as ``batch``
are waiting), from a thread of its own. Whatever reads impressions flushes first, so reads in
this process see every answer given; a crash loses at most the last interval's rows.

Forgetting reaches the buffer too: `forget` drops the persons' waiting rows (erasure) or
anonymises them (withdrawal), and for `grace` seconds afterwards an answer still being computed
for them is anonymised when it arrives. A flush takes its rows inside its own write transaction,
so it is ordered with the consumer's transaction that deletes the person's rows: on SQLite both
take the database's write lock (BEGIN IMMEDIATE); on PostgreSQL `forget` waits for a flush in
flight to commit, and the consumer's DELETE, which comes after `forget`, then sees its rows.
Either way no row naming a forgotten person survives the forgetting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from sqlalchemy import insert
from sqlalchemy.engine import Engine

from services.common.db import for_writes, is_sqlite
from services.recommend.store import impressions_table

logger = logging.getLogger(__name__)

INTERVAL_SECONDS: Final = 0.05
BATCH: Final = 500
GRACE_SECONDS: Final = 60.0


class ImpressionWriter:
    """Buffers impression rows (dicts of `recommend_impressions` columns) and inserts them."""

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = INTERVAL_SECONDS,
        batch: int = BATCH,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self._engine = for_writes(engine)
        self._sqlite = is_sqlite(engine)
        self._interval = interval
        self._batch = batch
        self._grace = grace
        self._rows: list[dict[str, Any]] = []
        self._forgotten: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, row: Mapping[str, Any]) -> None:
        with self._lock:
            values = dict(row)
            if values.get("person_id") and self._recently_forgotten(values["person_id"]):
                values["person_id"] = ""
            self._rows.append(values)
            waiting = len(self._rows)
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="recommend-impressions", daemon=True
                )
                self._thread.start()
        if waiting >= self._batch:
            self._wake.set()

    def forget(self, person_ids: Iterable[str], *, erase: bool) -> None:
        """Drop (erase) or anonymise the persons' waiting rows, and any arriving soon."""
        persons = set(person_ids)
        if not self._sqlite:
            with self._flush_lock:
                pass  # a flush in flight has committed, so the caller's DELETE will see its rows
        now = time.monotonic()
        with self._lock:
            for person in persons:
                self._forgotten[person] = now
            if erase:
                self._rows = [row for row in self._rows if row.get("person_id") not in persons]
            else:
                for row in self._rows:
                    if row.get("person_id") in persons:
                        row["person_id"] = ""

    def flush(self) -> int:
        """Insert every waiting row now; returns how many were written."""
        if not self._rows:
            return 0
        with self._flush_lock:
            rows: list[dict[str, Any]] = []
            try:
                with self._engine.begin() as connection:
                    with self._lock:
                        rows, self._rows = self._rows, []
                        self._expire_forgotten()
                        for row in rows:
                            if row.get("person_id") and self._recently_forgotten(row["person_id"]):
                                row["person_id"] = ""
                    if rows:
                        connection.execute(insert(impressions_table), rows)
            except Exception:
                with self._lock:
                    self._rows[:0] = rows
                raise
            return len(rows)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5.0)
        self.flush()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                logger.exception("writing impressions failed; will retry")
                self._stopping.wait(1.0)

    def _recently_forgotten(self, person_id: str) -> bool:
        at = self._forgotten.get(person_id)
        return at is not None and time.monotonic() - at < self._grace

    def _expire_forgotten(self) -> None:
        if not self._forgotten:
            return
        cutoff = time.monotonic() - self._grace
        self._forgotten = {p: at for p, at in self._forgotten.items() if at >= cutoff}
