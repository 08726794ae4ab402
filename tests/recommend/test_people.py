"""The in-memory view of persons that Recommend answers from stays exactly the database's
committed state: new events, withdrawals, rollbacks, merges and forgets of merged persons."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2

from services.common.migrations import upgrade
from services.recommend.models import CatalogueItem
from services.recommend.people import PersonRecord
from services.recommend.service import Query, RecommendService

T = common_pb2
CLOCK = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHOP = [CatalogueItem(f"i{n}", f"Item {n}", "c" if n < 4 else "d", ("t",), 5.0) for n in range(8)]


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def seen(person_id: str, item_id: str, n: int) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        behaviour_recorded=events_pb2.BehaviourRecorded(
            person_id=person_id,
            event_id=f"{person_id}-{item_id}-{n}",
            type=T.EVENT_TYPE_VIEW,
            item_id=item_id,
            occurred_at=stamp(CLOCK - timedelta(days=n)),
            purposes=["personalisation"],
        )
    )


def grant(person_id: str, allowed: bool = True) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        consent_changed=events_pb2.ConsentChanged(
            person_id=person_id, purpose="personalisation", allowed=allowed
        )
    )


@pytest.fixture
def service(engine: Engine) -> Iterator[RecommendService]:
    upgrade(engine, "recommend")
    service = RecommendService(engine, clock=lambda: CLOCK)
    service.put_items(SHOP, [None] * len(SHOP))
    with engine.begin() as connection:
        for person in ("p1", "p2"):
            service.apply_consent_envelope(connection, grant(person))
            service.apply_consent_envelope(connection, seen(person, "i0", 1))
    yield service
    service.stop()


def items_of(record: PersonRecord | None) -> list[str]:
    return sorted(record.item_ids) if record is not None else []


def read_singly(engine: Engine, person: str) -> PersonRecord | None:
    """The same person read by a view that was never loaded (straight from the database)."""
    from services.recommend.people import PersonView

    fresh = PersonView(engine)
    try:
        return fresh.get(person)
    finally:
        fresh.close()


def test_the_loaded_view_equals_the_database_and_answers_unknown_persons(
    service: RecommendService, engine: Engine
) -> None:
    assert service.people.load() == 2
    assert service.people.loaded
    for person in ("p1", "p2"):
        mine, stored = service.people.get(person), read_singly(engine, person)
        assert mine is not None and stored is not None
        assert (mine.allowed, mine.item_ids, mine.kinds) == (
            stored.allowed,
            stored.item_ids,
            stored.kinds,
        )
        assert mine.times.tolist() == stored.times.tolist()
    assert service.people.get("nobody") is None


def test_a_committed_event_is_seen_at_once_and_a_rolled_back_one_never(
    service: RecommendService, engine: Engine
) -> None:
    service.people.load()
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, seen("p1", "i1", 2))
        # Not committed yet: the view answers what the database has committed.
        assert items_of(service.people.get("p1")) == ["i0"]
    assert items_of(service.people.get("p1")) == ["i0", "i1"]
    answer = service.recommend(Query(person_id="p1", k=3))
    assert answer.personalised
    assert {"i0", "i1"}.isdisjoint(item.item_id for item in answer.items)  # seen: left out

    with pytest.raises(RuntimeError), engine.begin() as connection:
        service.apply_consent_envelope(connection, seen("p1", "i2", 3))
        raise RuntimeError("the batch failed")
    assert items_of(service.people.get("p1")) == ["i0", "i1"]


def test_a_withdrawal_makes_the_next_answer_impersonal(
    service: RecommendService, engine: Engine
) -> None:
    service.people.load()
    assert service.recommend(Query(person_id="p2")).personalised
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, grant("p2", allowed=False))
    record = service.people.get("p2")
    assert record is not None and not record.allowed and not record.item_ids
    assert not service.recommend(Query(person_id="p2")).personalised
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, grant("p3"))
    assert service.recommend(Query(person_id="p3")).personalised  # granted after the load


def test_merges_and_forgetting_a_merged_person_reach_the_survivor(
    service: RecommendService, engine: Engine
) -> None:
    service.people.load()
    merged = events_pb2.Envelope(
        persons_merged=events_pb2.PersonsMerged(
            surviving_person_id="p1", absorbed_person_ids=["p2"]
        )
    )
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, seen("p2", "i3", 4))
        service.apply_identity_envelope(connection, merged)
    assert items_of(service.people.get("p1")) == ["i0", "i0", "i3"]
    assert items_of(service.people.get("p2")) == []
    erased = events_pb2.Envelope(subject_erased=events_pb2.SubjectErased(person_id="p2"))
    with engine.begin() as connection:
        service.apply_consent_envelope(connection, erased)
    # What was collected for p2 is gone from the survivor too, at once.
    assert items_of(service.people.get("p1")) == ["i0"]
    assert items_of(service.people.get("p1")) == items_of(read_singly(engine, "p1"))
