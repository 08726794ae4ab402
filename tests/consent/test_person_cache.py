"""The person cache: an LRU of identifier sets, invalidated per person by identity's log."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given
from hypothesis import strategies as st
from steward.events.v1 import events_pb2

from services.consent.person_cache import PersonCache

KEYS = [("d1",), ("d2",), ("d1", "d3"), ("d4",), ("d5", "d6"), ("d7",)]
PERSONS = ["p1", "p2", "p3"]


def test_invalidating_a_person_drops_only_its_keys() -> None:
    cache = PersonCache()
    cache.put(("a",), "p1")
    cache.put(("a", "b"), "p1")
    cache.put(("c",), "p2")
    assert cache.invalidate(["p1", "p-unknown"]) == 2
    assert cache.get_many([("a",), ("a", "b"), ("c",)]) == [None, None, "p2"]
    assert len(cache) == 1


def test_a_key_moved_to_another_person_is_invalidated_with_its_new_owner() -> None:
    cache = PersonCache()
    cache.put(("a",), "p1")
    cache.put(("a",), "p2")
    assert cache.invalidate(["p1"]) == 0
    assert cache.get(("a",)) == "p2"
    assert cache.invalidate(["p2"]) == 1


def test_merge_unmerge_and_forget_envelopes_invalidate_the_persons_named() -> None:
    cache = PersonCache()
    for key, person in [(("a",), "s"), (("b",), "m"), (("c",), "r"), (("d",), "f"), (("e",), "x")]:
        cache.put(key, person)
    envelopes = [
        events_pb2.Envelope(
            persons_merged=events_pb2.PersonsMerged(
                surviving_person_id="s", absorbed_person_ids=["m"]
            )
        ),
        events_pb2.Envelope(
            person_unmerged=events_pb2.PersonUnmerged(
                surviving_person_id="s", restored_person_id="r"
            )
        ),
        events_pb2.Envelope(person_forgotten=events_pb2.PersonForgotten(person_id="f")),
    ]
    for envelope in envelopes:
        cache.apply(None, envelope)  # type: ignore[arg-type]
    assert cache.get_many([("a",), ("b",), ("c",), ("d",), ("e",)]) == [None] * 4 + ["x"]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS), st.sampled_from(PERSONS)),
        st.tuples(st.just("get"), st.sampled_from(KEYS), st.just("")),
        st.tuples(st.just("invalidate"), st.just(()), st.sampled_from(PERSONS)),
    ),
    max_size=60,
)


@given(operations=OPERATIONS, capacity=st.integers(1, 5))
def test_behaves_as_a_plain_lru_map(
    operations: list[tuple[str, tuple[str, ...], str]], capacity: int
) -> None:
    cache = PersonCache(capacity)
    model: OrderedDict[tuple[str, ...], str] = OrderedDict()
    for kind, key, person in operations:
        if kind == "put":
            cache.put(key, person)
            model[key] = person
            model.move_to_end(key)
            while len(model) > capacity:
                model.popitem(last=False)
        elif kind == "get":
            expected = model.get(key)
            if expected is not None:
                model.move_to_end(key)
            assert cache.get(key) == expected
        else:
            doomed = [k for k, p in model.items() if p == person]
            for k in doomed:
                del model[k]
            assert cache.invalidate([person]) == len(doomed)
        assert len(cache) == len(model)


def test_an_answer_asked_before_an_invalidation_is_not_kept() -> None:
    cache = PersonCache()
    asked_at = cache.generation
    cache.invalidate(["p1"])  # a merge arrived while identity was being asked
    cache.put(("a",), "p1", asked_at)
    assert cache.get(("a",)) is None
    cache.put(("a",), "p1", cache.generation)
    assert cache.get(("a",)) == "p1"
