"""Per-person data keys, kept in a database of their own, apart from the data they protect.

Each person gets a random AES-256 data key, stored only wrapped by the keyring's key-encryption
key. Fields that must stay readable (search text) are encrypted with it, and the person's ledger
*subject* is an HMAC of the person id under it. Erasure deletes the wrapped key: from then on the
encrypted fields cannot be decrypted, not even from a backup of the event database, and nothing
links the person's ledger entries to anybody.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy import Column, DateTime, LargeBinary, MetaData, String, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from services.common.keyring import Keyring
from services.common.migrations import upgrade

SERVICE: Final = "keystore"
VERSIONS_DIR: Final = Path(__file__).resolve().parent / "keystore_migrations" / "versions"
_SUBJECT_CONTEXT: Final = b"steward-ledger-subject\x00"
_CACHE_SIZE: Final = 100_000
_CHUNK: Final = 900

target_metadata = MetaData()
person_keys = Table(
    "keystore_person_keys",
    target_metadata,
    Column("person_id", String(40), primary_key=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def migrate(engine_or_url: Engine | str) -> None:
    """Bring the key store's database to the newest schema."""
    upgrade(engine_or_url, SERVICE, versions_dir=VERSIONS_DIR)


class KeyStore:
    """Creates, unwraps, caches and destroys per-person data keys. Thread-safe."""

    def __init__(self, engine: Engine, keyring: Keyring) -> None:
        self.engine = engine
        self._keyring = keyring
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"KeyStore({self.engine.url.render_as_string(hide_password=True)!r})"

    def data_key(self, person_id: str, *, create: bool = True) -> bytes | None:
        """The person's data key; created when missing (unless ``create`` is false)."""
        return self.data_keys([person_id], create=create).get(person_id)

    def data_keys(self, person_ids: Iterable[str], *, create: bool = True) -> dict[str, bytes]:
        """Data keys of many persons at once (one query for the uncached ones)."""
        wanted = list(dict.fromkeys(person_ids))
        found: dict[str, bytes] = {}
        with self._lock:
            for person in wanted:
                key = self._cache.get(person)
                if key is not None:
                    self._cache.move_to_end(person)
                    found[person] = key
        missing = [p for p in wanted if p not in found]
        if missing:
            found.update(self._load(missing))
        absent = [p for p in wanted if p not in found]
        if absent and create:
            self._create(absent)
            found.update(self._load(absent))
        with self._lock:
            for person, key in found.items():
                self._cache[person] = key
                self._cache.move_to_end(person)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return found

    def _load(self, person_ids: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self.engine.connect() as connection:
            for start in range(0, len(person_ids), _CHUNK):
                chunk = person_ids[start : start + _CHUNK]
                rows = connection.execute(
                    select(person_keys.c.person_id, person_keys.c.wrapped_key).where(
                        person_keys.c.person_id.in_(chunk)
                    )
                )
                for person, wrapped in rows:
                    found[person] = self._keyring.unwrap_data_key(bytes(wrapped))
        return found

    def _create(self, person_ids: list[str]) -> None:
        now = datetime.now(UTC)
        rows = [
            {"person_id": p, "wrapped_key": self._keyring.new_data_key()[1], "created_at": now}
            for p in person_ids
        ]
        with self.engine.begin() as connection:
            dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(person_keys).on_conflict_do_nothing(
                index_elements=[person_keys.c.person_id]
            )
            connection.execute(statement, rows)

    def destroy(self, person_ids: Iterable[str]) -> int:
        """Delete the persons' keys for good (crypto-shredding); returns how many existed."""
        wanted = list(dict.fromkeys(person_ids))
        with self._lock:
            for person in wanted:
                self._cache.pop(person, None)
        with self.engine.begin() as connection:
            result = connection.execute(
                delete(person_keys).where(person_keys.c.person_id.in_(wanted))
            )
        return int(result.rowcount or 0)

    def subject(self, person_id: str) -> str:
        """The person's ledger subject: unlinkable once the data key is destroyed."""
        key = self.data_key(person_id)
        assert key is not None
        digest = hmac.new(key, _SUBJECT_CONTEXT + person_id.encode(), hashlib.sha256).hexdigest()
        return f"s_{digest[:32]}"


__all__ = ["KeyStore", "migrate", "person_keys", "target_metadata"]
