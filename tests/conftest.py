"""Shared fixtures: a fresh database per test (SQLite file, PostgreSQL schema), NATS, and
Steward services started in-process on that database.

PostgreSQL and NATS tests run only when STEWARD_TEST_POSTGRES_URL / STEWARD_TEST_NATS_URL are set;
a URL that is set but unreachable fails the tests instead of skipping them silently.
STEWARD_TEST_TRANSPORT=jetstream runs every suite started by ``start_services`` on JetStream
(needs STEWARD_TEST_NATS_URL), each under a prefix of its own whose streams are deleted after.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import Engine, make_url

from services.common.config import Settings
from services.common.db import make_engine
from services.common.jetstream import delete_streams
from services.runtime import RunningSuite, start_suite

POSTGRES_URL_ENV = "STEWARD_TEST_POSTGRES_URL"
NATS_URL_ENV = "STEWARD_TEST_NATS_URL"
TRANSPORT_ENV = "STEWARD_TEST_TRANSPORT"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front which real backends this run uses, so a skipped backend is never silent."""
    postgres = os.environ.get(POSTGRES_URL_ENV)
    nats = os.environ.get(NATS_URL_ENV)
    return [
        "storage backends: sqlite, "
        + (
            f"postgresql ({postgres})"
            if postgres
            else f"postgresql SKIPPED ({POSTGRES_URL_ENV} unset)"
        ),
        "event bus: "
        + (f"nats jetstream ({nats})" if nats else f"nats SKIPPED ({NATS_URL_ENV} unset)"),
        f"start_services transport: {os.environ.get(TRANSPORT_ENV) or 'embedded'}",
    ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Lets `-m "not nats"` deselect every test that needs NATS, whichever fixture brings it in;
    # `-m suite` selects every test whose services come from start_services, the ones
    # STEWARD_TEST_TRANSPORT=jetstream moves onto JetStream.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "nats_url" in fixtures:
            item.add_marker(pytest.mark.nats)
        if "start_services" in fixtures:
            item.add_marker(pytest.mark.suite)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The test database's URL, checked once per session for reachability."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set; PostgreSQL tests need a database")
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"{POSTGRES_URL_ENV}={url} is set but unreachable: {exc}", pytrace=False)
    return url


@pytest.fixture
def postgres_schema_url(postgres_admin_url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped with everything in it afterwards."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin_url = _libpq_url(postgres_admin_url)
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = make_url(postgres_admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        _drop_schema(admin_url, schema)


def _drop_schema(admin_url: str, schema: str, attempts: int = 5) -> None:
    """Drop a test schema, retrying when a straggling background thread (a consumer still
    finishing its last transaction on a loaded machine) deadlocks with the drop."""
    for attempt in range(attempts):
        try:
            with psycopg.connect(admin_url, autocommit=True) as connection:
                # Fail rather than hang if a test leaked a connection holding locks in the schema.
                connection.execute("SET lock_timeout = '10s'")
                connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of its own for this test, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def nats_url() -> str:
    url = os.environ.get(NATS_URL_ENV)
    if not url:
        pytest.skip(f"{NATS_URL_ENV} is not set; NATS tests need a JetStream server")
    return url


def _libpq_url(url: str) -> str:
    """psycopg wants ``postgresql://``, whatever SQLAlchemy driver suffix the URL carries."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def jetstream_environ(nats_url: str, prefix: str) -> dict[str, str]:
    """The settings that carry a suite's event logs on JetStream, under streams of ``prefix``
    (delete them afterwards with ``delete_streams(nats_url, prefix, PRODUCERS)``)."""
    return {
        "STEWARD_TRANSPORT": "jetstream",
        "STEWARD_NATS_URL": nats_url,
        "STEWARD_JETSTREAM_PREFIX": prefix,
    }


OUTDOOR_RULES = """
tag_budget: 5
k_floor: 10
tags:
  - id: outdoor_fan
    category: affinity
    description: Mostly browses outdoor gear
    condition: p.category_affinity["outdoor"] > 0.5
    ttl: 30d
    priority: 5
  - id: offer_reminder
    category: engagement
    description: Reminded of offers in the categories browsed
    purpose: marketing
    condition: p.events_30d >= 1
    ttl: 14d
    priority: 1
"""
"""A rule set for suites of shoppers buying outdoor gear: one tag on profiling alone, one
gated on marketing."""


StartServices = Callable[..., RunningSuite]

PRODUCERS = ("consent", "identity", "tagging")
"""Every service with an event log, hence a stream on JetStream."""


@pytest.fixture
def start_services(tmp_path: Path, db_url: str) -> Iterator[StartServices]:
    """``start_services("consent", "identity", **settings)``: those services in this process, on
    a free port, with this test's database and data directory; stopped after the test.

    Keyword arguments replace ``Settings`` fields; ``environ`` adds environment variables as
    ``Settings.from_env`` reads them; the suite's own keywords (``metric_reader``,
    ``span_exporter``) pass through.
    """
    started: list[RunningSuite] = []
    jetstream_prefixes: list[str] = []
    transport = os.environ.get(TRANSPORT_ENV) or "embedded"
    nats_url = os.environ.get(NATS_URL_ENV, "")
    if transport == "jetstream" and not nats_url:
        pytest.fail(f"{TRANSPORT_ENV}=jetstream needs {NATS_URL_ENV}", pytrace=False)

    def start(
        *services: str, environ: dict[str, str] | None = None, **overrides: object
    ) -> RunningSuite:
        suite_options = {
            k: overrides.pop(k) for k in ("metric_reader", "span_exporter") if k in overrides
        }
        chosen_transport: dict[str, str] = {}
        if transport == "jetstream" and "STEWARD_TRANSPORT" not in (environ or {}):
            prefix = f"t{uuid.uuid4().hex[:12]}"
            jetstream_prefixes.append(prefix)
            chosen_transport = jetstream_environ(nats_url, prefix)
        settings = Settings.from_env(
            {
                "STEWARD_DATA_DIR": str(tmp_path / "data"),
                "STEWARD_DATABASE_URL": db_url,
                **chosen_transport,
                **(environ or {}),
            }
        )
        settings = dataclasses.replace(settings, port=0, **overrides)  # type: ignore[arg-type]
        running = start_suite(settings, services, **suite_options)  # type: ignore[arg-type]
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop(0)
    for prefix in jetstream_prefixes:
        delete_streams(nats_url, prefix, PRODUCERS)
