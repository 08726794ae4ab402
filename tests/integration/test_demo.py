"""`steward demo` against the whole suite started in this process (SQLite).

One suite and one demo run serve the whole module: a run trains the recommender and waits for
the consumers, which takes a while on a shared machine. The CLI test then plays a second,
smaller shop against the same suite, as a user who runs the demo twice would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.common.config import Settings
from services.demo.play import play
from services.demo.summary import DemoSummary
from services.runtime import RunningSuite, start_suite

CUSTOMERS = 30
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSuite]:
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(data_dir)})
    running = start_suite(dataclasses.replace(settings, port=0))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def summary(suite: RunningSuite) -> DemoSummary:
    return play(suite.target, customers=CUSTOMERS, seed=11, run_tag="it1")


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
    assert summary.erasure.services["consent"] == "DONE"
    assert summary.erasure.services["identity"] == "DONE"
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


def test_steward_demo_runs_against_the_suite(suite: RunningSuite) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--target", suite.target, "--customers", "12", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert "@example.org" not in result.output
