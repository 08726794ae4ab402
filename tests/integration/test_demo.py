"""`steward demo` against the whole suite started in this process, on SQLite and PostgreSQL.

One suite and one demo run per backend serve the whole module: a run trains the recommender and
waits for the consumers, which takes a while on a shared machine. After the demo, every table,
log line and span is scanned for the shoppers' raw identifiers (#9: "after the soak and the
demo"). The CLI test then plays a second, smaller shop against the same suite, as a user who
runs the demo twice would.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import psycopg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg import sql
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from services.cli import app
from services.common.config import SERVICE_DATABASES, Settings
from services.demo.play import play
from services.demo.shop import load_retail, plan_shop
from services.demo.summary import DemoSummary
from services.runtime import RunningSuite, start_suite
from services.testing.leaks import Needles, rows_naming
from tests.conftest import _drop_schema, _libpq_url

CUSTOMERS = 30
SEED = 11
RUN_TAG = "it1"
NOW = datetime.now(UTC)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Empty for SQLite files in the data directory; a fresh schema, dropped afterwards, else."""
    if request.param == "sqlite":
        yield ""
        return
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    schema = f"test_demo_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq_url(admin_url), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        _drop_schema(_libpq_url(admin_url), schema)


class LogLines(logging.Handler):
    """Every log record of the module's suite, as text with all its fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__}")


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def logs() -> Iterator[LogLines]:
    handler = LogLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Settings:
    environ = {"STEWARD_DATA_DIR": str(tmp_path_factory.mktemp("demo") / "data")}
    if database_url:
        environ["STEWARD_DATABASE_URL"] = database_url
    return dataclasses.replace(Settings.from_env(environ), port=0)


@pytest.fixture(scope="module")
def suite(
    settings: Settings, spans: InMemorySpanExporter, logs: LogLines
) -> Iterator[RunningSuite]:
    running = start_suite(settings, span_exporter=spans)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def summary(suite: RunningSuite) -> DemoSummary:
    with grpc.insecure_channel(suite.target) as channel:
        return play(channel, customers=CUSTOMERS, seed=SEED, run_tag=RUN_TAG, now=NOW)


def test_the_demo_collects_consented_events_across_channels(summary: DemoSummary) -> None:
    assert summary.shoppers == CUSTOMERS
    assert summary.events_accepted > 0
    assert set(summary.accepted_by_channel) >= {"web", "app"}
    # Shoppers who rejected the banner are not collected; the batch sent twice is refused.
    assert summary.dropped["NO_CONSENT"] > 0
    assert summary.dropped["DUPLICATE"] > 0
    assert summary.events_accepted + sum(summary.dropped.values()) == summary.events_sent
    assert summary.decisions_recorded >= 4 * CUSTOMERS
    assert summary.consumers_caught_up


def test_the_demo_merges_each_shopper_across_departments(summary: DemoSummary) -> None:
    assert summary.persons_after_merging == CUSTOMERS
    assert summary.persons_created > CUSTOMERS
    assert summary.automatic_merges > 0
    assert summary.explicit_merge_id
    assert summary.merged_person_identifiers["LOYALTY_CARD"] == ["store"]
    assert "web" in summary.merged_person_identifiers["EMAIL"]


def test_gpc_withdrawal_and_erasure_take_effect(summary: DemoSummary) -> None:
    assert not summary.gpc_marketing_allowed
    assert summary.gpc_marketing == "WITHDRAWN"
    assert summary.gpc_analytics_allowed  # GPC does not withdraw analytics
    assert summary.withdrawn_purpose == "personalisation"
    assert summary.withdrawal_reason == "WITHDRAWN"
    assert summary.erasure is not None
    assert summary.withdrawal_propagated
    assert summary.withdrawal_acknowledged_by == ["recommend", "tagging"]
    assert summary.erasure.state == "DONE", summary.erasure
    assert summary.erasure.services == dict.fromkeys(
        ("consent", "identity", "tagging", "recommend"), "DONE"
    )
    assert summary.erasure.consent_after == "ERASED"


def test_recommendations_and_tags_come_back(summary: DemoSummary) -> None:
    personalised = [r for r in summary.recommendations if r.personalised]
    assert personalised and all(r.titles for r in personalised)
    withdrawn = [r for r in summary.recommendations if "withdrew" in r.shopper]
    assert [r.personalised for r in withdrawn] == [False]
    assert any(state == "READY" for _, state, *_ in summary.models)
    assert summary.tags_granted.get("new_customer", 0) > 0
    assert set(summary.audiences) >= {"new_customer", "big_spender"}


def test_the_ledger_export_verifies(summary: DemoSummary) -> None:
    assert summary.ledger_verified, summary.ledger_problem
    assert summary.ledger_entries > summary.decisions_recorded
    assert summary.ledger_checkpoints_verified == summary.ledger_checkpoints >= 1


def test_the_demo_leaves_no_raw_identifier_in_any_table_log_line_or_span(
    settings: Settings, summary: DemoSummary, spans: InMemorySpanExporter, logs: LogLines
) -> None:
    shop = plan_shop(load_retail(), customers=CUSTOMERS, seed=SEED, now=NOW, run_tag=RUN_TAG)
    needles = Needles()
    for shopper in shop.shoppers:
        for kind in ("email", "cookie", "device", "card", "crm"):
            identifier = shopper.identifier(kind)
            if identifier.value:
                needles.add_identifier(identifier.type, identifier.value)
    assert len(needles) >= 3 * CUSTOMERS
    databases = {name: settings.db_url(name) for name in SERVICE_DATABASES}
    assert rows_naming(databases, needles) == {}
    logged = "\n".join(logs.lines)
    assert logs.lines and needles.found_in(logged) == set()
    exported = [
        f"{s.name} {dict(s.attributes or {})} {[dict(e.attributes or {}) for e in s.events]}"
        for s in spans.get_finished_spans()
    ]
    assert exported and needles.found_in("\n".join(exported)) == set()


def test_steward_demo_runs_against_the_suite(suite: RunningSuite) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--target", suite.target, "--customers", "12", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert "@example.org" not in result.output
