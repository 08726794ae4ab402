"""Profiles from events: windows, spend, carts, decayed category interest, lifecycle and RFM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from steward.common.v1 import common_pb2

from services.tagging.aggregates import (
    Event,
    RfmThresholds,
    compute_profile,
    lifecycle,
    purchases_of,
    rfm_thresholds,
)
from services.tagging.profile import PROFILE_FIELDS

E = common_pb2
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)  # a Monday


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


EVENTS = [
    Event("v1", E.EVENT_TYPE_VIEW, ago(1), "tent", "outdoor", channel="web"),
    Event("v2", E.EVENT_TYPE_VIEW, ago(2), "stove", "outdoor", channel="app"),
    Event("d1", E.EVENT_TYPE_DWELL, ago(2), "stove", "outdoor", dwell_ms=45_000, channel="app"),
    Event("v3", E.EVENT_TYPE_VIEW, ago(200), "pan", "kitchen", channel="web"),
    Event("c1", E.EVENT_TYPE_ADD_TO_CART, ago(3), "tent", "outdoor", channel="web"),
    Event("c2", E.EVENT_TYPE_ADD_TO_CART, ago(3), "lamp", "outdoor", channel="web"),
    Event(
        "p1",
        E.EVENT_TYPE_PURCHASE,
        ago(1),
        "tent",
        "outdoor",
        value=300.0,
        quantity=1,
        channel="web",
    ),
    Event(
        "p2",
        E.EVENT_TYPE_PURCHASE,
        ago(40),
        "pan",
        "kitchen",
        value=250.0,
        quantity=1,
        channel="store",
    ),
    Event("s1", E.EVENT_TYPE_SEARCH, ago(5), channel="web"),
    Event("future", E.EVENT_TYPE_VIEW, NOW + timedelta(days=1), "x", "outdoor"),
]


def test_profile_has_exactly_the_catalogue_fields_and_the_right_figures() -> None:
    profile = compute_profile("p_1", EVENTS, NOW)
    assert set(profile) == {*PROFILE_FIELDS, "person_id"}
    assert profile["events_7d"] == 7 and profile["events_90d"] == 8 and profile["events_30d"] == 7
    assert profile["spend_30d"] == 300.0 and profile["spend_90d"] == 550.0
    assert profile["orders_90d"] == 2 and profile["average_order_value"] == 275.0
    assert profile["type_counts_30d"] == {
        "view": 2,
        "dwell": 1,
        "add_to_cart": 2,
        "purchase": 1,
        "search": 1,
    }
    assert profile["cart_additions_30d"] == 2 and profile["cart_abandonment_rate"] == 0.5
    assert profile["searches_30d"] == 1
    affinity = profile["category_affinity"]
    assert isinstance(affinity, dict) and affinity["outdoor"] > 0.9 > affinity["kitchen"]
    assert abs(sum(affinity.values()) - 1.0) < 1e-6
    dwell = profile["category_dwell_seconds"]
    assert isinstance(dwell, dict) and 40 < dwell["outdoor"] < 45
    assert profile["channel_events_90d"] == {"web": 5, "app": 2, "store": 1}
    assert profile["channel_spend_90d"] == {"web": 300.0, "store": 250.0}
    assert profile["lifecycle"] == "active"
    assert profile["days_since_last_seen"] == 1.0 and profile["days_since_first_seen"] == 200.0


def test_weekday_and_weekend_are_told_apart() -> None:
    saturday = datetime(2026, 6, 13, 10, tzinfo=UTC)
    monday = datetime(2026, 6, 15, 10, tzinfo=UTC)
    events = [
        Event("a", E.EVENT_TYPE_PURCHASE, saturday, "hammock", "leisure", value=80.0),
        Event("b", E.EVENT_TYPE_PURCHASE, monday, "stapler", "office", value=20.0),
    ]
    profile = compute_profile("p_2", events, NOW)
    assert profile["weekend_spend_90d"] == 80.0 and profile["weekday_spend_90d"] == 20.0
    assert profile["weekend_events_90d"] == 1 and profile["weekday_events_90d"] == 1


def test_lifecycle_stages() -> None:
    assert lifecycle(10, 1, True) == "new"
    assert lifecycle(100, 10, True) == "active"
    assert lifecycle(100, 45, True) == "at_risk"
    assert lifecycle(300, 120, True) == "churned"
    assert lifecycle(0, 0, False) == ""


def test_rfm_quintiles_against_the_population() -> None:
    histories = [
        purchases_of(
            [
                Event(f"p{n}-{k}", E.EVENT_TYPE_PURCHASE, ago(n * 10 + k), value=10.0 * n)
                for k in range(n)
            ]
        )
        for n in range(1, 11)
    ]
    thresholds = rfm_thresholds(histories, NOW)
    assert (
        len(thresholds.recency_days) == len(thresholds.frequency) == len(thresholds.monetary) == 4
    )
    best = compute_profile(
        "p_best",
        [Event(f"b{k}", E.EVENT_TYPE_PURCHASE, ago(k), value=500.0) for k in range(12)],
        NOW,
        thresholds,
    )
    assert (best["rfm_recency"], best["rfm_frequency"], best["rfm_monetary"]) == (5, 5, 5)
    never = compute_profile("p_none", [Event("v", E.EVENT_TYPE_VIEW, ago(1))], NOW, thresholds)
    assert (never["rfm_recency"], never["rfm_frequency"], never["rfm_monetary"]) == (0, 0, 0)
    assert compute_profile("p_x", EVENTS, NOW, RfmThresholds())["rfm_recency"] == 3
