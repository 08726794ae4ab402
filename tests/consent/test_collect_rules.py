"""Collect's rules without a server: timelines answer as ``admit`` does, minimisation, validity."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.common.migrations import upgrade
from services.consent.collect import (
    ConsentTimeline,
    EventFields,
    admit,
    invalid_reason,
    kept_fields,
    minimise,
)
from services.consent.decisions import DecisionRecord
from services.consent.purposes import DEFAULT_PURPOSES
from services.consent.store import CollectionStore, ConsentStore
from services.consent.timelines import ConsentTimelines

C = consent_pb2
T = common_pb2
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PURPOSES = (
    *DEFAULT_PURPOSES,
    replace(DEFAULT_PURPOSES[0], id="fraud_checks", legal_basis=T.LEGAL_BASIS_LEGITIMATE_INTEREST),
)
DECISIONS = (T.DECISION_GRANTED, T.DECISION_DENIED, T.DECISION_WITHDRAWN)

# Moments on a coarse grid, so that decisions, expiries and events often coincide.
moments = st.integers(min_value=-6, max_value=6).map(lambda hours: NOW + timedelta(hours=hours))


@st.composite
def decision_lists(draw: st.DrawFn) -> list[DecisionRecord]:
    count = draw(st.integers(min_value=0, max_value=8))
    records = []
    for seq in range(1, count + 1):
        at = draw(moments)
        expires = draw(st.none() | moments.filter(lambda moment, at=at: moment > at))
        records.append(
            DecisionRecord(
                seq,
                "p_1",
                draw(st.sampled_from([p.id for p in PURPOSES])),
                draw(st.sampled_from(DECISIONS)),
                at,
                expires,
                C.CONSENT_SOURCE_WEB_BANNER,
                "2026-01",
            )
        )
    return records


@settings(max_examples=300, deadline=None)
@given(decision_lists(), st.lists(st.tuples(moments, moments), min_size=1, max_size=12))
def test_a_timeline_answers_as_admit_does(
    decisions: list[DecisionRecord], asked: list[tuple[datetime, datetime]]
) -> None:
    timeline = ConsentTimeline(decisions)
    for occurred_at, now in asked:
        expected = admit(PURPOSES, decisions, occurred_at, now)
        assert timeline.admit(PURPOSES, occurred_at, now, generation=1) == expected
        assert timeline.admit(PURPOSES, occurred_at, now) == expected


@settings(max_examples=100, deadline=None)
@given(decision_lists(), st.integers(min_value=0, max_value=8), moments, moments)
def test_a_timeline_takes_later_decisions_once(
    decisions: list[DecisionRecord], known: int, occurred_at: datetime, now: datetime
) -> None:
    earlier = ConsentTimeline(decisions[:known])
    # A remembered answer must not outlive the change.
    earlier.admit(PURPOSES, occurred_at, now, generation=1)
    # Later reads may repeat decisions the timeline already holds.
    caught_up = earlier.with_decisions(decisions[max(0, known - 2) :])
    assert caught_up.decisions == tuple(decisions)
    assert caught_up.admit(PURPOSES, occurred_at, now, generation=1) == admit(
        PURPOSES, decisions, occurred_at, now
    )


def test_a_timeline_forgets_its_answer_when_the_purposes_change() -> None:
    grant = DecisionRecord(
        1, "p_1", "analytics", T.DECISION_GRANTED, NOW, None, C.CONSENT_SOURCE_APP, "2026-01"
    )
    timeline = ConsentTimeline([grant])
    assert timeline.admit(PURPOSES, NOW, NOW, generation=1).purposes == (
        "analytics",
        "fraud_checks",
    )
    fewer = tuple(p for p in PURPOSES if p.id != "fraud_checks")
    assert timeline.admit(fewer, NOW, NOW, generation=2).purposes == ("analytics",)
    assert timeline.admit(PURPOSES, NOW, NOW, generation=3).purposes[-1] == "fraud_checks"


fields = st.builds(
    EventFields,
    event_id=st.just("e1"),
    type=st.just(T.EVENT_TYPE_PURCHASE),
    occurred_at=st.just(NOW),
    item_id=st.sampled_from(["", "sku-1"]),
    category=st.sampled_from(["", "garden"]),
    value=st.sampled_from([0.0, -0.0, 1e-300, 12.5]),
    dwell_ms=st.sampled_from([0, 1500]),
    query=st.sampled_from(["", "garden gnome"]),
    channel=st.sampled_from(["", "web"]),
    quantity=st.sampled_from([0, 2]),
    currency=st.sampled_from(["", "GBP"]),
    attributes=st.sampled_from([{}, {"coupon": "X1"}, {"utm": "n"}]),
)
keeps = st.sets(st.sampled_from(PURPOSES), max_size=4).map(kept_fields) | st.just(
    frozenset({"attributes.coupon", "value"})
)


@settings(max_examples=300, deadline=None)
@given(fields, keeps)
def test_minimise_empties_exactly_what_no_purpose_keeps(
    event: EventFields, keep: frozenset[str]
) -> None:
    kept = minimise(event, keep)
    for name in ("item_id", "category", "dwell_ms", "query", "channel", "quantity", "currency"):
        expected = getattr(event, name) if name in keep else type(getattr(event, name))()
        assert getattr(kept, name) == expected, name
    expected_value = event.value if "value" in keep else 0.0
    assert kept.value == expected_value
    assert math.copysign(1.0, kept.value) == math.copysign(1.0, expected_value)
    assert dict(kept.attributes) == {
        k: v for k, v in event.attributes.items() if f"attributes.{k}" in keep
    }
    assert (kept.event_id, kept.type, kept.occurred_at) == (
        event.event_id,
        event.type,
        event.occurred_at,
    )


def test_invalid_events_name_the_first_offending_field() -> None:
    event = EventFields("e1", T.EVENT_TYPE_VIEW, NOW, item_id="x" * 129, currency="gbp")
    assert invalid_reason(event, NOW) == "item_id: at most 128 characters"
    assert invalid_reason(replace(event, item_id=""), NOW).startswith("currency:")
    assert invalid_reason(replace(event, event_id="", type=0), NOW) == "event_id: is required"
    assert invalid_reason(replace(event, occurred_at=None), NOW) == "occurred_at: is required"
    late = replace(event, item_id="", currency="", occurred_at=NOW + timedelta(minutes=6))
    assert invalid_reason(late, NOW) == "occurred_at: more than 5 minutes in the future"
    many = replace(event, item_id="", currency="", attributes={str(n): "v" for n in range(33)})
    assert invalid_reason(many, NOW) == "attributes: at most 32"
    search = replace(event, item_id="", currency="", type=T.EVENT_TYPE_SEARCH)
    assert invalid_reason(search, NOW) == "query: required for SEARCH"
    assert invalid_reason(replace(search, query="gnome", value=math.nan), NOW).startswith("value")
    assert invalid_reason(replace(search, query="gnome"), NOW) == ""


def test_timelines_catch_up_with_decisions_recorded_since_the_last_batch(engine: Engine) -> None:
    upgrade(engine, "consent")
    consent = ConsentStore(engine)
    timelines = ConsentTimelines(CollectionStore(consent), catch_up_limit=3)

    def record(seq: int, person: str, decision: int, purpose: str = "analytics") -> None:
        row = DecisionRecord(
            seq, person, purpose, decision, NOW, None, C.CONSENT_SOURCE_APP, "2026-01"
        )  # type: ignore[arg-type]
        with consent.writing() as connection:
            consent.save_decisions(connection, [(row, False)])

    def admitted(person: str) -> tuple[str, ...]:
        with consent.writing() as connection:
            timeline = timelines.of(connection, [person])[person]
        return timeline.admit(DEFAULT_PURPOSES, NOW, NOW).purposes

    record(1, "p_a", T.DECISION_GRANTED)
    assert admitted("p_a") == ("analytics",)
    assert admitted("p_b") == ()  # not decided yet: held all the same
    record(2, "p_b", T.DECISION_GRANTED, "profiling")
    record(3, "p_a", T.DECISION_WITHDRAWN)
    assert admitted("p_a") == () and admitted("p_b") == ("profiling",)
    assert len(timelines) == 2
    for seq in range(4, 9):  # more than the catch-up limit: start afresh
        record(seq, "p_a", T.DECISION_GRANTED if seq % 2 == 0 else T.DECISION_DENIED)
    assert admitted("p_a") == ("analytics",) and len(timelines) == 1
    timelines.forget(["p_a"])
    assert len(timelines) == 0
    assert admitted("p_a") == ("analytics",)


def test_erased_persons_are_found_whether_the_markers_are_held_or_looked_up(
    engine: Engine,
) -> None:
    from services.common.keyring import Keyring
    from services.consent.collection import _ErasedPersons

    upgrade(engine, "consent")
    store = CollectionStore(ConsentStore(engine))
    keyring = Keyring.generate()

    def markers(person: str) -> list[str]:
        return keyring.candidate_digests(b"erased:" + person.encode())

    held, looked_up = _ErasedPersons(store, markers), _ErasedPersons(store, markers)
    looked_up.HELD = 0  # type: ignore[misc]
    with engine.begin() as connection:
        assert held.among(connection, ["p_1", "p_2"]) == set()
        store.mark_erased(connection, markers("p_2"), NOW)
        assert held.among(connection, ["p_1", "p_2"]) == {"p_2"}
        assert looked_up.among(connection, ["p_1", "p_2"]) == {"p_2"}
        store.mark_erased(connection, markers("p_1"), NOW)  # a new count reloads the markers
        assert held.among(connection, ["p_1", "p_3"]) == {"p_1"}
        assert looked_up.among(connection, ["p_1", "p_3"]) == {"p_1"}
