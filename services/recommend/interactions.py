"""Interactions: what each event type is worth, how old history fades, and the matrix of both.

An interaction is `(person, item, weight, time)`: the weight comes from the event type
(`InteractionSettings.weight`), and decays with age by a half-life, so a purchase a year ago counts
less than a view yesterday. The matrix builder aggregates in a fixed order (person, item, time,
weight), which makes it a pure function of the *set* of interactions: the input order never
changes a single bit of the result, and dropping a person's interactions gives exactly the
matrix built without them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse

from services.recommend.models.base import (
    Catalogue,
    FloatArray,
    History,
    IntArray,
    InteractionMatrix,
)

SECONDS_PER_DAY = 86_400.0


class EventType(StrEnum):
    """Behaviour events the recommender learns from."""

    VIEW = "view"
    DWELL = "dwell"
    SEARCH_CLICK = "search_click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"


# How each event reads in an explanation ("because you bought X").
VERBS: Mapping[str, str] = {
    EventType.VIEW: "viewed",
    EventType.DWELL: "viewed",
    EventType.SEARCH_CLICK: "viewed",
    EventType.ADD_TO_CART: "added to cart",
    EventType.PURCHASE: "bought",
}

DEFAULT_WEIGHTS: Mapping[str, float] = {
    EventType.VIEW: 1.0,
    EventType.DWELL: 2.0,
    EventType.SEARCH_CLICK: 2.0,
    EventType.ADD_TO_CART: 4.0,
    EventType.PURCHASE: 8.0,
}


@dataclass(frozen=True)
class InteractionSettings:
    """Weights per event type, the dwell threshold and the half-life of history.

    A dwell counts only at or over `dwell_threshold_seconds`; an event type without a weight
    counts nothing. `half_life_days=None` turns decay off.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    dwell_threshold_seconds: float = 30.0
    half_life_days: float | None = 30.0

    def __post_init__(self) -> None:
        if any(weight < 0 or not math.isfinite(weight) for weight in self.weights.values()):
            raise ValueError("event weights must be finite and non-negative")
        if self.half_life_days is not None and self.half_life_days <= 0:
            raise ValueError("half_life_days must be positive (or None for no decay)")

    def weight(self, event_type: str, dwell_seconds: float | None = None) -> float:
        """The undecayed weight of one event (0.0: the event does not count)."""
        if event_type == EventType.DWELL and (
            dwell_seconds is None or dwell_seconds < self.dwell_threshold_seconds
        ):
            return 0.0
        return float(self.weights.get(event_type, 0.0))

    @property
    def half_life_seconds(self) -> float | None:
        return None if self.half_life_days is None else self.half_life_days * SECONDS_PER_DAY


class Interaction(NamedTuple):
    """One weighted interaction; `occurred_at` in seconds since the epoch (or a datetime)."""

    person_id: str
    item_id: str
    weight: float
    occurred_at: float | datetime
    event_type: str = ""


def decay(age_seconds: FloatArray, half_life_seconds: float | None) -> FloatArray:
    """0.5 ** (age / half-life); events in the future (negative age) count fully."""
    if half_life_seconds is None:
        return np.ones_like(age_seconds, dtype=np.float64)
    return np.asarray(np.exp2(-np.maximum(age_seconds, 0.0) / half_life_seconds), dtype=np.float64)


def timestamp(moment: float | datetime) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


def build_interaction_matrix(
    interactions: Iterable[Interaction | tuple[str, str, float, float | datetime]],
    catalogue: Catalogue,
    *,
    now: float | datetime,
    half_life_days: float | None = None,
) -> InteractionMatrix:
    """Persons x items of summed decayed weights; items outside the catalogue are skipped.

    `now` is the reference time of the decay, given explicitly so training is reproducible.
    Interactions with weight ≤ 0 are skipped.
    """
    persons: list[str] = []
    items: list[int] = []
    weights: list[float] = []
    times: list[float] = []
    for interaction in interactions:
        person_id, item_id, weight, occurred_at = interaction[:4]
        if weight <= 0 or item_id not in catalogue:
            continue
        persons.append(person_id)
        items.append(catalogue.index(item_id))
        weights.append(float(weight))
        times.append(timestamp(occurred_at))
    person_ids = sorted(set(persons))
    person_index = {person: position for position, person in enumerate(person_ids)}
    rows = np.array([person_index[person] for person in persons], dtype=np.int64)
    matrix, counts = _aggregate(
        rows,
        np.array(items, dtype=np.int64),
        np.array(weights, dtype=np.float64),
        np.array(times, dtype=np.float64),
        shape=(len(person_ids), len(catalogue)),
        now=timestamp(now),
        half_life_days=half_life_days,
    )
    return InteractionMatrix(tuple(person_ids), matrix, counts)


def build_history(
    events: Iterable[
        tuple[str, float, float | datetime] | tuple[str, float, float | datetime, str]
    ],
    catalogue: Catalogue,
    *,
    now: float | datetime,
    half_life_days: float | None = None,
) -> History:
    """One person's history from `(item_id, weight, time[, event_type])` at request time.

    Same aggregation as the training matrix, so a person's history equals their training row.
    Each item's verb comes from its heaviest event (the latest among equals).
    """
    items: list[int] = []
    weights: list[float] = []
    times: list[float] = []
    kinds: list[str] = []
    for event in events:
        item_id, weight, occurred_at = event[0], event[1], event[2]
        if weight <= 0 or item_id not in catalogue:
            continue
        items.append(catalogue.index(item_id))
        weights.append(float(weight))
        times.append(timestamp(occurred_at))
        kinds.append(str(event[3]) if len(event) > 3 else "")
    return history_of(
        items, weights, times, kinds, now=timestamp(now), half_life_days=half_life_days
    )


def history_of(
    items: Sequence[int],
    weights: Sequence[float],
    times: Sequence[float],
    kinds: Sequence[str],
    *,
    now: float,
    half_life_days: float | None = None,
) -> History:
    """`build_history` on catalogue indices, weights (> 0), epoch seconds and event types: the
    request path. A person has a few dozen events, so the sorting and grouping are plain Python
    (numpy's per-call cost would dominate); the decay and the sums are numpy's, in
    `_aggregate`'s order, so the weights are the training row's to the bit.
    """
    count = len(items)
    if count == 0:
        return History.empty()
    half_life = None if half_life_days is None else half_life_days * SECONDS_PER_DAY
    # `_aggregate`'s order: by item, then time, then weight (stable: then position).
    order = [entry[3] for entry in sorted(zip(items, times, weights, range(count), strict=True))]
    ordered = [items[j] for j in order]
    starts = [0, *(p for p in range(1, count) if ordered[p] != ordered[p - 1])]
    decayed = np.array([weights[j] for j in order], dtype=np.float64) * decay(
        now - np.array([times[j] for j in order], dtype=np.float64), half_life
    )
    sums = np.add.reduceat(decayed, starts)
    kept = (sums > 0).tolist()
    ends = [*starts[1:], count]
    indices: list[int] = []
    verbs: list[str] = []
    for start, end, keep in zip(starts, ends, kept, strict=True):
        if not keep:
            continue
        indices.append(ordered[start])
        # The heaviest event of each item names it (the latest among equals, then the last).
        named = (
            order[start]
            if end - start == 1
            else max(order[start:end], key=lambda j: (weights[j], times[j], j))
        )
        verbs.append(VERBS.get(kinds[named], "viewed"))
    return History(
        np.array(indices, dtype=np.int64),
        np.asarray(sums[np.array(kept, dtype=np.bool_)], dtype=np.float64),
        tuple(verbs),
    )


def _aggregate(
    rows: IntArray,
    columns: IntArray,
    weights: FloatArray,
    times: FloatArray,
    *,
    shape: tuple[int, int],
    now: float,
    half_life_days: float | None,
) -> tuple[Any, IntArray]:
    half_life = None if half_life_days is None else half_life_days * SECONDS_PER_DAY
    counts = np.bincount(rows, minlength=shape[0]).astype(np.int64)
    if rows.size == 0:
        return sparse.csr_matrix(shape, dtype=np.float64), counts
    order = np.lexsort((weights, times, columns, rows))
    rows, columns = rows[order], columns[order]
    decayed = weights[order] * decay(now - times[order], half_life)
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (columns[1:] != columns[:-1])])
    # A sequential sum per (person, item) group in sorted order: the same bits every time.
    sums = np.add.reduceat(decayed, starts)
    keep = sums > 0
    group_rows = rows[starts][keep]
    indptr = np.r_[0, np.cumsum(np.bincount(group_rows, minlength=shape[0]))].astype(np.int64)
    matrix = sparse.csr_matrix((sums[keep], columns[starts][keep], indptr), shape=shape)
    return matrix, counts


def purchased_items(events: Iterable[tuple[str, str]], catalogue: Catalogue) -> IntArray:
    """Indices of items bought, from `(item_id, event_type)` pairs (for the default filter)."""
    bought = {item_id for item_id, event_type in events if event_type == EventType.PURCHASE}
    return np.unique(catalogue.indices(sorted(bought)))
