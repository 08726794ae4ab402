"""pytest plugin: the ``steward`` fixture, a whole suite per test on temporary storage.

Installed with Steward (entry point ``pytest11: steward``), so a project that depends on
Steward gets the fixture without importing anything. ``--steward-database-url`` (or the
``STEWARD_TEST_DATABASE_URL`` environment variable) runs the suites on that database instead
of temporary SQLite files; the tests then share it, so give each run a database of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.testing import StewardSuite, steward_suite

DATABASE_URL_ENV = "STEWARD_TEST_DATABASE_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("steward", "Steward suite for integration tests")
    group.addoption(
        "--steward-database-url",
        default=None,
        help=f"database for the suites the `steward` fixture starts (default: ${DATABASE_URL_ENV}"
        ", else temporary SQLite files)",
    )


@pytest.fixture
def steward(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StewardSuite]:
    """The whole suite, started for this test on a free port and stopped after it."""
    database_url = request.config.getoption("--steward-database-url") or os.environ.get(
        DATABASE_URL_ENV
    )
    with steward_suite(database_url=database_url, data_dir=tmp_path / "steward") as suite:
        yield suite
