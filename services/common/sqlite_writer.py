"""A single writer connection for a SQLite file, with WAL checkpoints off the commit path.

Used by identity's graph writes and by every consent write transaction (Collect's batches commit
many pages each, RecordConsent's decisions commit hundreds of times a second); see
:class:`SqliteWriter`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine

from services.common.db import make_engine

_log = logging.getLogger(__name__)

CHECKPOINT_EVERY: Final = 8
"""Commits between two passive WAL checkpoints on SQLite."""
CHECKPOINT_RESTART_FRAMES: Final = 16_384
"""WAL frames (64 MiB of 4 KiB pages) past which checkpoints try to copy the whole log back, so
the next commit starts it afresh; past twice as many, one holds the write lock to do so."""
WAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024
WRITER_CACHE_KIB: Final = 65_536
CHECKPOINTER_IDLE_SECONDS: Final = 10.0
CHECKPOINT_MIN_INTERVAL_SECONDS: Final = 0.25
"""At most four checkpoints a second: small transactions (a consent decision) commit hundreds of
times a second, and a checkpoint every few of them would cost more than the commits."""


class SqliteWriter:
    """One connection for a service's hot writes on a SQLite file, with checkpoints off the commit.

    Such writes (identity's graph, consent's) are serialised anyway (``BEGIN
    IMMEDIATE``). Queueing them on one connection behind a lock wakes the next writer the moment
    the previous one commits, where SQLite's busy handler sleeps up to 100 ms between tries, and
    keeps that connection's page cache warm (a connection drops its cache whenever another one
    has written). SQLite's automatic checkpoint copies the WAL back into the database inside the
    COMMIT that crosses 1,000 pages, with the write lock held: a fifth of Resolve's server time.
    Here automatic checkpoints are off for this connection; every few commits a checkpoint thread
    runs a passive checkpoint while the next batches write (SQLite releases the GIL), and no
    caller waits for it. A passive checkpoint rarely catches a log that commits keep extending,
    and the log starts afresh only once it has been copied in full: past
    :data:`CHECKPOINT_RESTART_FRAMES` further passes copy what committed meanwhile, and past
    twice that one holds the write lock to finish (measured: a 100 ms stall every dozen commits
    when that was the only way). Other connections keep the automatic checkpoint, so the WAL
    stays bounded even without this one. Use it as ``with writer.lock,
    for_writes(writer.engine).begin() as connection: ...`` then ``writer.committed()``, and never
    nest two such transactions: the writer has one connection.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = make_engine(engine.url, pool_size=1, max_overflow=0)
        event.listen(self.engine, "connect", _configure_writer)
        self.lock = threading.Lock()
        self._state = threading.Lock()
        self._commits = 0
        self._wanted = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._closed = False
        self._stopping = threading.Event()

    def committed(self) -> None:
        """Count a commit; every :data:`CHECKPOINT_EVERY`, wake (or start) the checkpointer."""
        with self._state:
            self._commits += 1
            if self._commits < CHECKPOINT_EVERY or self._closed:
                return
            self._commits = 0
            self._wanted.set()
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(
                    target=self._checkpoints, name="sqlite-wal-checkpoint", daemon=True
                )
                self._checkpointer.start()

    def _checkpoints(self) -> None:
        """Checkpoint whenever asked; end after a quiet spell (a new thread starts on demand)."""
        while True:
            self._wanted.wait(timeout=CHECKPOINTER_IDLE_SECONDS)
            with self._state:
                if not self._wanted.is_set() or self._closed:
                    self._checkpointer = None
                    return
                self._wanted.clear()
            began = time.monotonic()
            try:
                self._checkpoint()
            except sqlite3.Error:
                # The batches have committed; a failed checkpoint is retried after later commits.
                _log.warning("SQLite WAL checkpoint failed", exc_info=True)
            # Commits meanwhile only set the flag again; the next pass copies what they wrote.
            rest = CHECKPOINT_MIN_INTERVAL_SECONDS - (time.monotonic() - began)
            if rest > 0:
                self._stopping.wait(rest)

    def _checkpoint(self) -> None:
        database = self.engine.url.database or ""
        connection = sqlite3.connect(
            database, timeout=5, isolation_level=None, uri=database.startswith("file:")
        )
        try:
            passive = "PRAGMA wal_checkpoint(PASSIVE)"
            _, frames, copied = connection.execute(passive).fetchone()
            # A checkpoint that copies the whole log lets the next commit start it afresh; one
            # or two more passes usually catch what committed during the first.
            for _ in range(2):
                if frames <= CHECKPOINT_RESTART_FRAMES or copied == frames:
                    return
                _, frames, copied = connection.execute(passive).fetchone()
            if frames > 2 * CHECKPOINT_RESTART_FRAMES and copied < frames:
                with self.lock:
                    connection.execute("PRAGMA wal_checkpoint(RESTART)")
        finally:
            connection.close()

    def dispose(self) -> None:
        with self._state:
            self._closed = True
            checkpointer = self._checkpointer
            self._wanted.set()
            self._stopping.set()
        if checkpointer is not None:
            checkpointer.join(timeout=30)
        self.engine.dispose()


def _configure_writer(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        # When the log restarts, its file shrinks back to this size.
        cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    finally:
        cursor.close()
