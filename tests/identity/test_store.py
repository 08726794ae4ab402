"""The identity store's storage: its migrations and, on SQLite, its writer's WAL checkpoints."""

from __future__ import annotations

import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, insert
from sqlalchemy.engine import Engine

from services.common.db import make_engine
from services.common.keyring import Keyring
from services.common.migrations import upgrade, versions_directory
from services.common.sqlite_writer import CHECKPOINT_EVERY
from services.identity.service import IdentityService
from services.identity.store import IdentityStore, pg_array_literal
from tests.identity.conftest import Clock, make_item

FIRST_REVISION = "67e64e544229"


def _tables_of_the_first_revision() -> tuple[Table, Table, Table]:
    """persons, identifiers and identifier_sources as revision 67e64e544229 made them."""
    metadata = MetaData()
    persons = Table(
        "persons",
        metadata,
        Column("person_id", String, primary_key=True),
        Column("root_id", String),
        Column("alias_of", String),
        Column("merged_by", String),
        Column("created_at", DateTime(timezone=True)),
    )
    identifiers = Table(
        "identifiers",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("digest", String),
        Column("type", Integer),
        Column("namespace", String),
        Column("person_id", String),
        Column("quarantined", Boolean),
        Column("first_seen", DateTime(timezone=True)),
        Column("last_seen", DateTime(timezone=True)),
    )
    sources = Table(
        "identifier_sources",
        metadata,
        Column("identifier_id", Integer, primary_key=True),
        Column("source", String, primary_key=True),
    )
    return persons, identifiers, sources


def test_integer_person_keys_migration_keeps_persons_roots_aliases_and_identifiers(
    engine: Engine, tmp_path: Path, keyring: Keyring, clock: Clock
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    for script in versions_directory("identity").glob(f"{FIRST_REVISION}_*.py"):
        shutil.copy(script, first)
    upgrade(engine, "identity", versions_dir=first)
    persons, identifiers, sources = _tables_of_the_first_revision()
    born = datetime(2025, 6, 1, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(
            insert(persons),
            [
                {"person_id": "p_old", "root_id": "p_old", "alias_of": None, "merged_by": None}
                | {"created_at": born},
                {"person_id": "p_young", "root_id": "p_old", "alias_of": "p_old"}
                | {"merged_by": "m_1", "created_at": born + timedelta(days=1)},
                {"person_id": "p_apart", "root_id": "p_apart", "alias_of": None}
                | {"merged_by": None, "created_at": born + timedelta(days=2)},
            ],
        )
        connection.execute(
            insert(identifiers),
            [
                {"id": 7, "digest": "k1:aa", "type": 2, "namespace": "", "person_id": "p_old"}
                | {"quarantined": False, "first_seen": born, "last_seen": born},
                {"id": 8, "digest": "k1:bb", "type": 3, "namespace": "", "person_id": "p_young"}
                | {"quarantined": True, "first_seen": born, "last_seen": born},
                {"id": 9, "digest": "k1:cc", "type": 2, "namespace": "", "person_id": "p_apart"}
                | {"quarantined": False, "first_seen": born, "last_seen": born},
            ],
        )
        connection.execute(
            insert(sources),
            [
                {"identifier_id": 7, "source": "web"},
                {"identifier_id": 8, "source": "pos"},
                {"identifier_id": 9, "source": "app"},
            ],
        )

    upgrade(engine, "identity")

    identity = IdentityService(IdentityStore(engine), keyring, clock)
    with identity.store.reading() as reader:
        known = reader.known_identifiers(["k1:aa", "k1:bb", "k1:cc"])
        roots = reader.roots_of(["p_old", "p_young", "p_apart"])
    assert {d: (k.id, k.origin, k.quarantined, k.sources) for d, k in known.items()} == {
        "k1:aa": (7, "p_old", False, {"web"}),
        "k1:bb": (8, "p_young", True, {"pos"}),
        "k1:cc": (9, "p_apart", False, {"app"}),
    }
    assert roots == {"p_old": "p_old", "p_young": "p_old", "p_apart": "p_apart"}
    merged = identity.person("p_young")
    assert merged.person_id == "p_old" and merged.alias_person_ids == ["p_young"]
    assert merged.created_at == born
    assert [i.hashed_value for i in merged.identifiers] == ["k1:aa", "k1:bb"]
    # New persons and identifiers take keys and ids after the migrated ones.
    result = identity.resolve([make_item(identity, ("EMAIL", "new@example.com"), seen_at=born)])
    created = identity.person(result[0].person_id)
    assert created.alias_person_ids == [] and len(created.identifiers) == 1
    assert identity.lookup([["k1:cc"]]) == [("p_apart", "k1:cc")]


def test_sqlite_writer_checkpoints_the_wal_into_the_database_file(
    tmp_path: Path, keyring: Keyring
) -> None:
    path = tmp_path / "identity.db"
    engine = make_engine(f"sqlite:///{path}")
    identity_store = IdentityStore(engine)
    try:
        upgrade(engine, "identity")
        identity = IdentityService(identity_store, keyring)
        for batch in range(CHECKPOINT_EVERY):
            identity.resolve(
                [make_item(identity, ("COOKIE_ID", f"c-{batch}-{n}")) for n in range(50)]
            )
        expected = 50 * CHECKPOINT_EVERY
        # immutable=1 reads the database file alone, as if the WAL were not there.
        deadline, in_file = time.monotonic() + 30, 0
        while in_file < expected and time.monotonic() < deadline:
            file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
            try:
                in_file = file.execute("SELECT count(*) FROM identifiers").fetchone()[0]
            except sqlite3.OperationalError:  # not even the migration checkpointed yet
                in_file = 0
            finally:
                file.close()
            time.sleep(0.05)
        assert in_file == expected
    finally:
        identity_store.close()
        engine.dispose()


def test_postgres_array_literals_read_back_as_the_values(postgres_admin_url: str) -> None:
    """Resolve binds its PostgreSQL arrays as literal text (psycopg's list dumper is slow):
    quotes, backslashes, blanks, the word NULL, None, numbers, booleans and aware or naive
    datetimes all come back as given."""
    texts = ['a\\"b', None, "x y", "", "NULL", "{,}", 'q"', "\\", "é ü"]
    moments = [
        datetime(2026, 11, 23, 3, 0, 0, 123456, tzinfo=UTC),
        None,
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 5, 5, 1, 2, 3),
    ]
    with psycopg.connect(postgres_admin_url, autocommit=True) as connection:

        def read(literal: str, type_: str) -> list[Any]:
            row = connection.execute(f"SELECT %s::{type_}[]", (literal,)).fetchone()
            assert row is not None
            return list(row[0])

        assert read(pg_array_literal(texts, "text"), "text") == texts
        assert read(pg_array_literal([5, None, 2**40], "bigint"), "bigint") == [5, None, 2**40]
        assert read(pg_array_literal([5, 7], "text"), "bigint") == [5, 7]
        assert read(pg_array_literal([True, False, None], "boolean"), "boolean") == [
            True,
            False,
            None,
        ]
        assert read(pg_array_literal(moments, "timestamptz"), "timestamptz") == [
            moments[0],
            None,
            moments[2],
            moments[3].replace(tzinfo=UTC),
        ]
