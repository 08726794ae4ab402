"""A person's behaviour profile, computed from the minimised events kept for profiling.

Everything is a pure function of the person's events, ``now`` and the population's RFM
thresholds, so a profile can always be recomputed (after an unmerge, say) and tests choose their
own clock. Windows are trailing (last 7, 30, 90 days); category interest decays exponentially
with a half-life, so last month's browsing counts for more than last year's.

Lifecycle stages: ``new`` (first seen within 30 days), ``active`` (seen within 30 days),
``at_risk`` (last seen 31 to 90 days ago), ``churned`` (not seen for more than 90 days).
RFM: recency, frequency and monetary quintiles (1 to 5, 5 best) against thresholds computed over
the population of buyers (:func:`rfm_thresholds`); 0 for persons who never bought.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from steward.common.v1 import common_pb2

from services.tagging.profile import ProfileDict, profile_dict

E = common_pb2
DAY: Final = timedelta(days=1)
CATEGORY_HALF_LIFE_DAYS: Final = 30.0
NEW_DAYS: Final = 30
ACTIVE_DAYS: Final = 30
AT_RISK_DAYS: Final = 90

TYPE_KEYS: Final[dict[int, str]] = {
    E.EVENT_TYPE_VIEW: "view",
    E.EVENT_TYPE_DWELL: "dwell",
    E.EVENT_TYPE_SEARCH: "search",
    E.EVENT_TYPE_SEARCH_CLICK: "search_click",
    E.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    E.EVENT_TYPE_REMOVE_FROM_CART: "remove_from_cart",
    E.EVENT_TYPE_PURCHASE: "purchase",
}


@dataclass(frozen=True, slots=True)
class Event:
    """A minimised behaviour event as tagging keeps it."""

    event_id: str
    type: int
    occurred_at: datetime
    item_id: str = ""
    category: str = ""
    value: float = 0.0
    dwell_ms: int = 0
    quantity: int = 0
    channel: str = ""


@dataclass(frozen=True, slots=True)
class RfmThresholds:
    """Quintile boundaries over the population of buyers (ascending, four cut points each)."""

    recency_days: tuple[float, ...] = ()
    frequency: tuple[float, ...] = ()
    monetary: tuple[float, ...] = ()


@dataclass(slots=True)
class _Window:
    events: int = 0
    types: Counter[str] = field(default_factory=Counter)


def _quintile(value: float, cuts: Sequence[float], *, higher_is_better: bool) -> int:
    if not cuts:
        return 3
    position = bisect.bisect_right(list(cuts), value)  # 0..4
    return position + 1 if higher_is_better else 5 - position


def compute_profile(
    person_id: str,
    events: Iterable[Event],
    now: datetime,
    thresholds: RfmThresholds = RfmThresholds(),
) -> ProfileDict:
    """The profile of one person at ``now`` (events after ``now`` are ignored)."""
    kept = sorted((e for e in events if e.occurred_at <= now), key=lambda e: e.occurred_at)
    windows = {7: _Window(), 30: _Window(), 90: _Window()}
    spend = {30: 0.0, 90: 0.0}
    order_days: dict[int, set[object]] = {30: set(), 90: set()}
    category_views: defaultdict[str, float] = defaultdict(float)
    category_dwell: defaultdict[str, float] = defaultdict(float)
    category_activity: defaultdict[str, float] = defaultdict(float)
    channel_events: Counter[str] = Counter()
    channel_spend: defaultdict[str, float] = defaultdict(float)
    weekday = {"events": 0, "spend": 0.0}
    weekend = {"events": 0, "spend": 0.0}
    carts: dict[str, datetime] = {}
    cart_additions_30d = abandoned = 0
    purchases: list[tuple[datetime, str, float]] = []
    searches_30d = 0
    for event in kept:
        age_days = (now - event.occurred_at) / DAY
        key = TYPE_KEYS.get(event.type, "other")
        is_purchase = event.type == E.EVENT_TYPE_PURCHASE
        for days, window in windows.items():
            if age_days <= days:
                window.events += 1
                window.types[key] += 1
        if is_purchase:
            purchases.append((event.occurred_at, event.item_id, event.value))
            for days in spend:
                if age_days <= days:
                    spend[days] += event.value
                    order_days[days].add(event.occurred_at.date())
        if age_days <= 30 and event.type == E.EVENT_TYPE_SEARCH:
            searches_30d += 1
        decay = math.exp2(-age_days / CATEGORY_HALF_LIFE_DAYS)
        if event.category:
            category_activity[event.category] += decay
            if event.type == E.EVENT_TYPE_VIEW:
                category_views[event.category] += decay
            if event.type == E.EVENT_TYPE_DWELL:
                category_dwell[event.category] += decay * event.dwell_ms / 1000.0
        if age_days <= 90:
            channel = event.channel or "unknown"
            channel_events[channel] += 1
            side = weekend if event.occurred_at.weekday() >= 5 else weekday
            side["events"] += 1
            if is_purchase:
                channel_spend[channel] += event.value
                side["spend"] += event.value
        if event.type == E.EVENT_TYPE_ADD_TO_CART and event.item_id:
            carts[event.item_id] = event.occurred_at
            if age_days <= 30:
                cart_additions_30d += 1
    bought_after = {(item, at) for at, item, _ in purchases}
    for item, added in carts.items():
        if (now - added) / DAY <= 30 and not any(
            i == item and at >= added for i, at in bought_after
        ):
            abandoned += 1
    total_activity = sum(category_activity.values())
    first_seen = kept[0].occurred_at if kept else None
    last_seen = kept[-1].occurred_at if kept else None
    days_first = (now - first_seen) / DAY if first_seen else 0.0
    days_last = (now - last_seen) / DAY if last_seen else 0.0
    orders_90 = len(order_days[90])
    profile: dict[str, Any] = {
        "person_id": person_id,
        "days_since_first_seen": round(days_first, 6),
        "days_since_last_seen": round(days_last, 6),
        "events_7d": windows[7].events,
        "events_30d": windows[30].events,
        "events_90d": windows[90].events,
        "type_counts_7d": dict(windows[7].types),
        "type_counts_30d": dict(windows[30].types),
        "type_counts_90d": dict(windows[90].types),
        "spend_30d": round(spend[30], 2),
        "spend_90d": round(spend[90], 2),
        "orders_30d": len(order_days[30]),
        "orders_90d": orders_90,
        "average_order_value": round(spend[90] / orders_90, 2) if orders_90 else 0.0,
        "cart_additions_30d": cart_additions_30d,
        "cart_abandonment_rate": (
            round(abandoned / len(carts), 6) if carts and cart_additions_30d else 0.0
        ),
        "searches_30d": searches_30d,
        "category_views": {k: round(v, 6) for k, v in category_views.items()},
        "category_dwell_seconds": {k: round(v, 6) for k, v in category_dwell.items()},
        "category_affinity": (
            {k: round(v / total_activity, 6) for k, v in category_activity.items()}
            if total_activity
            else {}
        ),
        "channel_events_90d": dict(channel_events),
        "channel_spend_90d": {k: round(v, 2) for k, v in channel_spend.items()},
        "weekday_events_90d": weekday["events"],
        "weekend_events_90d": weekend["events"],
        "weekday_spend_90d": round(float(weekday["spend"]), 2),
        "weekend_spend_90d": round(float(weekend["spend"]), 2),
        "lifecycle": lifecycle(days_first, days_last, bool(kept)),
    }
    profile.update(rfm_scores(purchases, now, thresholds))
    return profile_dict(profile) | {"person_id": person_id}


def lifecycle(days_since_first: float, days_since_last: float, seen: bool) -> str:
    if not seen:
        return ""
    if days_since_last > AT_RISK_DAYS:
        return "churned"
    if days_since_last > ACTIVE_DAYS:
        return "at_risk"
    if days_since_first <= NEW_DAYS:
        return "new"
    return "active"


def _rfm_inputs(
    purchases: Sequence[tuple[datetime, str, float]], now: datetime
) -> tuple[float, float, float] | None:
    if not purchases:
        return None
    recency = (now - max(at for at, _, _ in purchases)) / DAY
    frequency = float(len({at.date() for at, _, _ in purchases}))
    monetary = sum(value for _, _, value in purchases)
    return recency, frequency, monetary


def rfm_scores(
    purchases: Sequence[tuple[datetime, str, float]], now: datetime, thresholds: RfmThresholds
) -> dict[str, int]:
    inputs = _rfm_inputs(purchases, now)
    if inputs is None:
        return {"rfm_recency": 0, "rfm_frequency": 0, "rfm_monetary": 0}
    recency, frequency, monetary = inputs
    return {
        "rfm_recency": _quintile(recency, thresholds.recency_days, higher_is_better=False),
        "rfm_frequency": _quintile(frequency, thresholds.frequency, higher_is_better=True),
        "rfm_monetary": _quintile(monetary, thresholds.monetary, higher_is_better=True),
    }


def rfm_thresholds(
    purchase_histories: Iterable[Sequence[tuple[datetime, str, float]]], now: datetime
) -> RfmThresholds:
    """Quintile cut points over every buyer in the population."""
    recencies, frequencies, monetaries = [], [], []
    for purchases in purchase_histories:
        inputs = _rfm_inputs(purchases, now)
        if inputs is not None:
            recencies.append(inputs[0])
            frequencies.append(inputs[1])
            monetaries.append(inputs[2])

    def cuts(values: list[float]) -> tuple[float, ...]:
        if len(values) < 5:
            return ()
        ordered = sorted(values)
        return tuple(ordered[len(ordered) * q // 5] for q in range(1, 5))

    return RfmThresholds(cuts(recencies), cuts(frequencies), cuts(monetaries))


def purchases_of(events: Iterable[Event]) -> list[tuple[datetime, str, float]]:
    return [(e.occurred_at, e.item_id, e.value) for e in events if e.type == E.EVENT_TYPE_PURCHASE]
