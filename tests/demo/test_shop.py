"""The demo shop made from the UCI Online Retail CSV: deterministic, synthetic, in time order."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from steward.common.v1 import common_pb2

from services.demo.play import call_metadata
from services.demo.shop import (
    ACCEPT_ALL,
    CUSTOM_GRANTS,
    PURPOSES,
    REJECT_ALL,
    RetailData,
    department_of,
    load_retail,
    plan_shop,
)

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def retail() -> RetailData:
    return load_retail()


def test_the_shipped_csv_is_the_uci_slice(retail: RetailData) -> None:
    # 756 customers, of whom 56 only cancelled orders.
    customers = {invoice.customer_id for invoice in retail.invoices}
    assert len(customers) == 700
    assert len(retail.items) > 2000
    assert retail.cancellation_lines > 0
    assert all(line.quantity > 0 for invoice in retail.invoices for line in invoice.lines)


def test_departments_come_from_the_description_words() -> None:
    assert department_of(["white", "hanging", "heart", "t", "light", "holder"]) == "lighting"
    assert department_of(["paper", "chain", "kit", "vintage", "christmas"]) == "christmas"
    assert department_of(["regency", "cakestand", "tier", "cake"]) == "kitchen"
    assert department_of(["jumbo", "bag", "red", "retrospot"]) == "storage"
    assert department_of(["cream", "cupid", "hearts", "coat", "hanger"]) == "home_decor"


def test_the_same_seed_plans_the_same_shop(retail: RetailData) -> None:
    first = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag="t1")
    again = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag="t1")
    other = plan_shop(retail, customers=60, seed=8, now=NOW, run_tag="t1")
    assert [p.message for p in first.events] == [p.message for p in again.events]
    assert [s.grants for s in first.shoppers] == [s.grants for s in again.shoppers]
    assert [s.customer_id for s in first.shoppers] != [s.customer_id for s in other.shoppers]


def test_events_run_in_time_order_and_end_before_now(retail: RetailData) -> None:
    shop = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag="t1")
    moments = [p.message.occurred_at.ToDatetime(tzinfo=UTC) for p in shop.events]
    assert moments == sorted(moments)
    assert NOW - timedelta(days=8) < moments[-1] <= NOW - timedelta(hours=1)
    # Shifted by whole weeks: the orders keep their weekdays (1 December 2010 was a Wednesday).
    assert shop.starts_at.weekday() == (datetime(2010, 12, 1).weekday() - 1) % 7
    event_ids = [p.message.event_id for p in shop.events]
    assert len(set(event_ids)) == len(event_ids)


def test_every_purchase_line_is_replayed_with_its_value(retail: RetailData) -> None:
    shop = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag="t1")
    customers = {s.customer_id for s in shop.shoppers}
    lines = [
        line
        for invoice in retail.invoices
        if invoice.customer_id in customers
        for line in invoice.lines
    ]
    purchases = [p.message for p in shop.events if p.message.type == common_pb2.EVENT_TYPE_PURCHASE]
    assert len(purchases) == len(lines) == shop.purchases
    assert sum(p.value for p in purchases) == pytest.approx(
        sum(round(line.quantity * line.unit_price, 2) for line in lines)
    )
    assert {p.currency for p in purchases} == {"GBP"}


def test_browsing_precedes_orders_on_web_and_app_but_not_in_store(retail: RetailData) -> None:
    shop = plan_shop(retail, customers=120, seed=7, now=NOW, run_tag="t1")
    types = Counter((p.message.channel, p.message.type) for p in shop.events)
    assert types["store", common_pb2.EVENT_TYPE_PURCHASE] > 0
    assert types["store", common_pb2.EVENT_TYPE_VIEW] == 0
    sessions: dict[str, set[int]] = {}
    for planned in shop.events:
        session = planned.message.event_id.rpartition("-")[0]
        if planned.message.channel != "store":
            sessions.setdefault(session, set()).add(planned.message.type)
    ordered = [kinds for kinds in sessions.values() if common_pb2.EVENT_TYPE_PURCHASE in kinds]
    assert ordered
    for kinds in ordered:
        assert {common_pb2.EVENT_TYPE_VIEW, common_pb2.EVENT_TYPE_ADD_TO_CART} <= kinds
    assert types["web", common_pb2.EVENT_TYPE_SEARCH] > 0


def test_identifiers_are_synthetic_and_carry_the_run_tag(retail: RetailData) -> None:
    shop = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag="abc123")
    for shopper in shop.shoppers:
        assert shopper.email.endswith(".abc123@example.org")
        assert "abc123" in shopper.cookie and "abc123" in shopper.crm_id
        assert set(shopper.grants) == set(PURPOSES)
    assert all(p.message.event_id.startswith("demo-abc123-") for p in shop.events)


def test_two_runs_share_no_identifier(retail: RetailData) -> None:
    kinds = ("email", "cookie", "device", "card", "crm")

    def values(tag: str) -> set[str]:
        shop = plan_shop(retail, customers=60, seed=7, now=NOW, run_tag=tag)
        return {
            shopper.identifier(kind).value
            for shopper in shop.shoppers
            for kind in kinds
            if shopper.identifier(kind).value
        }

    first, second = values("aaa111"), values("bbb222")
    assert len(first) > 3 * 60
    assert not first & second


def test_banner_answers_follow_the_published_rates(retail: RetailData) -> None:
    shop = plan_shop(retail, customers=700, seed=7, now=NOW, run_tag="t1")
    count = len(shop.shoppers)
    answers = Counter(s.banner for s in shop.shoppers)
    assert answers["accept_all"] / count == pytest.approx(ACCEPT_ALL, abs=0.05)
    assert answers["reject_all"] / count == pytest.approx(REJECT_ALL, abs=0.05)
    custom = 1 - ACCEPT_ALL - REJECT_ALL
    for purpose in PURPOSES:
        share = sum(s.grants[purpose] for s in shop.shoppers) / count
        assert share == pytest.approx(ACCEPT_ALL + custom * CUSTOM_GRANTS[purpose], abs=0.06)


def test_the_demo_names_itself_and_leaves_credentials_to_the_channel() -> None:
    assert dict(call_metadata()) == {"x-steward-caller": "steward-demo"}
