"""The SQLite writer: one queue for a file's writes, checkpoints off the commit and rate-limited."""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import text

from services.common.db import for_writes, make_engine
from services.common.sqlite_writer import (
    CHECKPOINT_EVERY,
    CHECKPOINT_MIN_INTERVAL_SECONDS,
    SqliteWriter,
)


def write(writer: SqliteWriter, value: int) -> None:
    with writer.lock, for_writes(writer.engine).begin() as connection:
        connection.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
    writer.committed()


@pytest.fixture
def writer(tmp_path: Path) -> SqliteWriter:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v INTEGER)"))
    engine.dispose()
    return SqliteWriter(make_engine(f"sqlite:///{tmp_path / 'w.db'}"))


def test_many_small_commits_get_at_most_a_few_checkpoints_a_second(
    writer: SqliteWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[float] = []
    real = SqliteWriter._checkpoint

    def counted(self: SqliteWriter) -> None:
        passes.append(time.monotonic())
        real(self)

    monkeypatch.setattr(SqliteWriter, "_checkpoint", counted)
    began = time.monotonic()
    commits = 40 * CHECKPOINT_EVERY
    try:
        for value in range(commits):
            write(writer, value)
        elapsed = time.monotonic() - began
        deadline = time.monotonic() + 5
        while not passes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        writer.dispose()
    assert passes, "no checkpoint ran"
    # One per CHECKPOINT_EVERY commits would be 40; the interval allows far fewer.
    allowed = elapsed / CHECKPOINT_MIN_INTERVAL_SECONDS + 2
    assert len(passes) <= min(allowed, commits // CHECKPOINT_EVERY)
    gaps = [later - earlier for earlier, later in pairwise(passes)]
    assert all(gap >= CHECKPOINT_MIN_INTERVAL_SECONDS * 0.9 for gap in gaps)


def test_dispose_does_not_wait_out_the_interval(writer: SqliteWriter) -> None:
    for value in range(CHECKPOINT_EVERY):
        write(writer, value)
    time.sleep(0.05)  # the checkpointer has run and is resting
    began = time.monotonic()
    writer.dispose()
    assert time.monotonic() - began < CHECKPOINT_MIN_INTERVAL_SECONDS


def test_writes_from_many_threads_all_commit_in_turn(writer: SqliteWriter) -> None:
    def worker(start: int) -> None:
        for value in range(start, start + 50):
            write(writer, value)

    threads = [threading.Thread(target=worker, args=(n * 50,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with writer.engine.connect() as connection:
            values = connection.execute(text("SELECT v FROM t ORDER BY v")).scalars().all()
    finally:
        writer.dispose()
    assert values == list(range(200))
