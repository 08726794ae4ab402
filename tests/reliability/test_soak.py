"""The soak's short version (``bench/soak.py`` runs the long one): the four services in
processes of their own under a shop's mixed traffic, then the consistency check across them and
the scan of every table, log line and exported span for the raw identifiers the traffic used.

The traffic runs 12 s rather than the issue's 30: at 40 operations a second that is about 480
operations, which brings every kind (Collect with retries, consent changes, Resolve, GetTags,
Recommend, withdrawals, erasures) several times, and the test checks that it did; what a longer
run adds is memory and throughput figures, which belong in the bench's output, not in a test.
The check waits for the consumers for up to 60 s. Nothing about time or memory is asserted.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> ModuleType:
    """A module of bench/, which imports its siblings as top-level modules (as when run)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite files; for PostgreSQL, the server on which the run makes its database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_admin_url")
    return url


def test_a_short_soak_keeps_the_services_consistent_and_leaks_no_identifier(
    database_url: str | None, tmp_path: Path
) -> None:
    soak = bench_module("soak")
    options = soak.Options(
        seconds=12.0,
        rate=40.0,
        persons=100,
        sample_seconds=6.0,
        check_sample=0,
        settle_seconds=60.0,
        database_url=database_url,
        work_dir=tmp_path,
    )
    report = soak.run_soak(options, say=lambda line: None)
    soak.print_report(report, options)  # shown by pytest when the test fails

    # Every kind of operation happened, so the checks below are about something.
    done = report.operations
    for kind in ("collect", "consent_change", "resolve", "get_tags", "recommend", "withdrawal"):
        assert done[kind] >= 3, (kind, done)
    assert done["erasure"] >= 1, done
    assert report.events_accepted > 0 and report.stopped_purposes > 0
    assert report.scanned["spans"] > 0 and report.scanned["log lines"] > 0

    failed = {
        rpc: {code: n for code, n in codes.items() if code in ("UNKNOWN", "INTERNAL")}
        for rpc, codes in report.calls.codes.items()
    }
    assert not any(failed.values()), failed
    assert report.consistency == []
    assert report.leaks == {}
