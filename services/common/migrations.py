"""Alembic migrations, one history per service, all driven through one shared environment.

Each service keeps its revisions in ``services/<service>/migrations/versions/`` and records the
applied revision in its own table, ``alembic_version_<service>``, so several services can share one
PostgreSQL database without touching each other's history.

A service registers its tables for autogenerate by exposing ``target_metadata`` (a
``sqlalchemy.MetaData``) in ``services/<service>/store.py``; :func:`upgrade` never imports it,
because applying revisions needs only the scripts.

Services call :func:`upgrade` before they serve; ``create_all`` is for tests only.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection, Engine

from services.common.db import for_writes, is_postgres, make_engine

SERVICES_DIR = Path(__file__).resolve().parent.parent
ALEMBIC_ENV_DIR = Path(__file__).resolve().parent / "alembic"

_SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]*")

# Alembic drives migrations through module-global proxies (alembic.context, alembic.op), so two
# migrations running at once in one process would use each other's connection.
_alembic_lock = threading.RLock()


def version_table(service: str) -> str:
    return f"alembic_version_{_checked(service)}"


def versions_directory(service: str) -> Path:
    return SERVICES_DIR / _checked(service) / "migrations" / "versions"


def service_metadata(service: str) -> MetaData:
    """The ``target_metadata`` that ``services.<service>.store`` registers for autogenerate."""
    module = import_module(f"services.{_checked(service)}.store")
    metadata = getattr(module, "target_metadata", None)
    if not isinstance(metadata, MetaData):
        raise LookupError(f"services.{service}.store defines no target_metadata (a MetaData)")
    return metadata


def upgrade(engine_or_url: Engine | str, service: str, *, versions_dir: Path | None = None) -> None:
    """Apply the service's migrations up to head; a no-op when already there.

    Runs in one transaction. Concurrent upgrades of the same service (replicas starting together)
    are serialised: by an advisory lock on PostgreSQL, by ``BEGIN IMMEDIATE`` on SQLite, and
    within one process by a lock, as Alembic is not thread-safe.
    """
    versions = versions_dir or versions_directory(service)
    if not versions.is_dir():
        # Alembic would quietly find nothing to do, and the service would fail later instead.
        raise FileNotFoundError(f"no migrations for {service}: {versions} is not a directory")
    with (
        _alembic_lock,
        _engine(engine_or_url) as engine,
        for_writes(engine).begin() as connection,
    ):
        if is_postgres(connection):
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(service)}
            )
        config = _config(service, versions, connection=connection)
        command.upgrade(config, "head")


def current_revision(engine: Engine, service: str) -> str | None:
    """The revision applied to this database for the service, or None if never migrated."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": version_table(service)}
        )
        return context.get_current_revision()


def head_revision(service: str, *, versions_dir: Path | None = None) -> str | None:
    """The newest revision among the service's scripts, or None if it has none yet."""
    return ScriptDirectory.from_config(_config(service, versions_dir)).get_current_head()


def revision(
    engine_or_url: Engine | str,
    service: str,
    message: str,
    *,
    metadata: MetaData | None = None,
    autogenerate: bool = True,
    versions_dir: Path | None = None,
) -> Path:
    """Write a new revision script for the service and return its path.

    With autogenerate, the database is first upgraded to head, then compared with ``metadata``
    (default: :func:`service_metadata`); point it at a scratch database. Tables the metadata does
    not know are left alone, as they may belong to another service sharing the database, so
    dropping a table needs a hand edit. Scripts are tidied with ruff when it is installed.
    """
    directory = versions_dir or versions_directory(service)
    directory.mkdir(parents=True, exist_ok=True)
    target = metadata if metadata is not None or not autogenerate else service_metadata(service)
    with _alembic_lock, _engine(engine_or_url) as engine:
        if autogenerate:
            upgrade(engine, service, versions_dir=directory)
        with engine.connect() as connection:
            config = _config(service, directory, connection=connection, metadata=target)
            _format_with_ruff(config)
            script = command.revision(config, message=message, autogenerate=autogenerate)
    if script is None or isinstance(script, list):
        raise RuntimeError(f"alembic wrote no single revision for {service}")
    return Path(script.path)


def _format_with_ruff(config: Config) -> None:
    """Leave new scripts lint-clean (imports sorted, unused ones dropped) when ruff is installed."""
    if find_spec("ruff") is None:
        return
    config.set_section_option("post_write_hooks", "hooks", "ruff_fix, ruff_format")
    for hook, arguments in (("ruff_fix", "check --fix --quiet"), ("ruff_format", "format --quiet")):
        config.set_section_option("post_write_hooks", f"{hook}.type", "module")
        config.set_section_option("post_write_hooks", f"{hook}.module", "ruff")
        config.set_section_option(
            "post_write_hooks", f"{hook}.options", f"{arguments} REVISION_SCRIPT_FILENAME"
        )


def _checked(service: str) -> str:
    if not _SERVICE_NAME.fullmatch(service):
        raise ValueError(f"service name {service!r} must be lower_snake_case")
    return service


def _lock_key(service: str) -> int:
    return zlib.crc32(f"steward.migrations.{service}".encode())


@contextmanager
def _engine(engine_or_url: Engine | str) -> Iterator[Engine]:
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = make_engine(engine_or_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _config(
    service: str,
    versions_dir: Path | None,
    *,
    connection: Connection | None = None,
    metadata: MetaData | None = None,
) -> Config:
    config = Config()
    # Option values go through ConfigParser interpolation, hence the escaped "%".
    config.set_main_option("script_location", str(ALEMBIC_ENV_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    locations = str(versions_dir or versions_directory(service))
    config.set_main_option("version_locations", locations.replace("%", "%%"))
    config.attributes["service"] = _checked(service)
    config.attributes["version_table"] = version_table(service)
    config.attributes["connection"] = connection
    config.attributes["target_metadata"] = metadata
    return config
