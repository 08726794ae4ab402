"""The merge tree a consumer of identity's log keeps, against a model of identity's merges."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine

from services.common.person_links import PersonLinks, person_links_table

METADATA = MetaData()
LINKS = PersonLinks(person_links_table(METADATA, prefix="test_"))


class Model:
    """Identity's view, simply: each person's parent, by the merge that made it."""

    def __init__(self) -> None:
        self.parent: dict[str, tuple[str, str]] = {}

    def root(self, person: str) -> str:
        while person in self.parent:
            person = self.parent[person][0]
        return person

    def merge(self, merge_id: str, survivor: str, absorbed: str) -> bool:
        if self.root(survivor) == self.root(absorbed):
            return False
        # Identity merges roots into the survivor's group.
        self.parent[self.root(absorbed)] = (survivor, merge_id)
        return True

    def groups(self, persons: list[str]) -> dict[str, list[str]]:
        return {p: sorted(q for q in persons if self.root(q) == self.root(p)) for p in persons}


PERSONS = [f"p{i}" for i in range(6)]
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("merge"), st.sampled_from(PERSONS), st.sampled_from(PERSONS)),
        st.tuples(st.just("unmerge"), st.integers(0, 20), st.just("")),
    ),
    max_size=25,
)


@pytest.fixture
def links_engine(engine: Engine) -> Engine:
    METADATA.create_all(engine)
    return engine


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_groups_follow_any_sequence_of_merges_and_unmerges(
    links_engine: Engine, steps: list[tuple[str, object, str]]
) -> None:
    model = Model()
    merges: list[tuple[str, str]] = []  # (merge id, absorbed root) still in force
    with links_engine.begin() as connection:
        connection.execute(LINKS.table.delete())
        for number, (kind, first, second) in enumerate(steps):
            if kind == "merge":
                survivor, absorbed = str(first), second
                absorbed_root = model.root(absorbed)
                merge_id = f"m{number}"
                if model.merge(merge_id, survivor, absorbed):
                    LINKS.merge(connection, merge_id, survivor, [absorbed_root])
                    merges.append((merge_id, absorbed_root))
            elif merges:
                merge_id, restored = merges.pop(int(str(first)) % len(merges))
                del model.parent[restored]
                change = LINKS.unmerge(connection, merge_id, restored)
                # Whose data goes back: the restored person and its own merged persons.
                assert sorted(change.handed_back) == sorted(
                    q for q in PERSONS if model.root(q) == restored
                )
            expected = model.groups(PERSONS)
            for person in PERSONS:
                group = LINKS.group(connection, person)
                assert sorted(group) == expected[person]
                assert group[0] == model.root(person)
            together = LINKS.groups(connection, PERSONS)
            assert {p: sorted(g) for p, g in together.items()} == {
                p: g for p, g in expected.items() if len(g) > 1
            }


def test_forget_drops_the_whole_group(links_engine: Engine) -> None:
    with links_engine.begin() as connection:
        LINKS.merge(connection, "m1", "a", ["b"])
        LINKS.merge(connection, "m2", "a", ["c"])
        LINKS.merge(connection, "m3", "x", ["y"])
        assert LINKS.forget(connection, ["a", "b", "c"]).changed == {"a", "b", "c"}
        assert LINKS.group(connection, "b") == ["b"]
        assert LINKS.group(connection, "x") == ["x", "y"]


def test_undoing_a_merge_twice_or_one_never_seen_changes_nothing(links_engine: Engine) -> None:
    with links_engine.begin() as connection:
        LINKS.merge(connection, "m1", "a", ["b"])
        assert LINKS.unmerge(connection, "m-unknown", "b").changed == set()
        assert LINKS.group(connection, "a") == ["a", "b"]
        assert LINKS.unmerge(connection, "m1", "b").changed == {"a", "b"}
        assert LINKS.unmerge(connection, "m1", "b").changed == set()
        assert LINKS.group(connection, "a") == ["a"]


def test_an_unmerge_hands_back_the_restored_persons_own_merges_wherever_they_went(
    links_engine: Engine,
) -> None:
    with links_engine.begin() as connection:
        LINKS.merge(connection, "m1", "r", ["r2"])  # r had absorbed r2
        LINKS.merge(connection, "m2", "s", ["r"])  # then s absorbed r
        LINKS.merge(connection, "m3", "t", ["s"])  # and later t absorbed s
        assert LINKS.group(connection, "r2") == ["t", "r", "r2", "s"]
        change = LINKS.unmerge(connection, "m2", "r")
        assert sorted(change.handed_back) == ["r", "r2"]
        assert LINKS.group(connection, "r2") == ["r", "r2"]
        assert LINKS.group(connection, "s") == ["t", "s"]
