"""Consent folds the decisions of persons identity merged, and splits them when undone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.migrations import upgrade
from services.consent import links
from services.consent.store import links_table, person_group, person_groups
from services.runtime import RunningSuite

C = consent_pb2
T = common_pb2
L = identity_pb2

# The links on their own, against a model of identity's merges --------------------------------


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
def consent_engine(engine: Engine) -> Engine:
    upgrade(engine, "consent")
    return engine


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_groups_follow_any_sequence_of_merges_and_unmerges(
    consent_engine: Engine, steps: list[tuple[str, object, str]]
) -> None:
    model = Model()
    merges: list[tuple[str, str]] = []  # (merge id, absorbed root) still in force
    with consent_engine.begin() as connection:
        connection.execute(links_table.delete())
        for number, (kind, first, second) in enumerate(steps):
            if kind == "merge":
                survivor, absorbed = str(first), second
                absorbed_root = model.root(absorbed)
                merge_id = f"m{number}"
                if model.merge(merge_id, survivor, absorbed):
                    links.merge(connection, merge_id, survivor, [absorbed_root])
                    merges.append((merge_id, absorbed_root))
            elif merges:
                merge_id, restored = merges.pop(int(str(first)) % len(merges))
                del model.parent[restored]
                links.unmerge(connection, merge_id, restored)
            expected = model.groups(PERSONS)
            for person in PERSONS:
                group = person_group(connection, person)
                assert sorted(group) == expected[person]
                assert group[0] == model.root(person)
            together = person_groups(connection, PERSONS)
            assert {p: sorted(g) for p, g in together.items()} == {
                p: g for p, g in expected.items() if len(g) > 1
            }


def test_forget_drops_the_whole_group(consent_engine: Engine) -> None:
    with consent_engine.begin() as connection:
        links.merge(connection, "m1", "a", ["b"])
        links.merge(connection, "m2", "a", ["c"])
        links.merge(connection, "m3", "x", ["y"])
        assert links.forget(connection, ["a", "b", "c"]) == {"a", "b", "c"}
        assert person_group(connection, "b") == ["b"]
        assert person_group(connection, "x") == ["x", "y"]


def test_undoing_a_merge_twice_or_one_never_seen_changes_nothing(consent_engine: Engine) -> None:
    with consent_engine.begin() as connection:
        links.merge(connection, "m1", "a", ["b"])
        assert links.unmerge(connection, "m-unknown", "b") == set()
        assert person_group(connection, "a") == ["a", "b"]
        assert links.unmerge(connection, "m1", "b") == {"a", "b"}
        assert links.unmerge(connection, "m1", "b") == set()
        assert person_group(connection, "a") == ["a"]


# Through the services -----------------------------------------------------------------------

EMAIL = "grace.hopper@example.org"
COOKIE = "ck-4f1d9b2c"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite]) -> RunningSuite:
    return start_services("consent", "identity")


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


def ident(kind: int, value: str) -> common_pb2.Identifier:
    return T.Identifier(type=kind, value=value)  # type: ignore[arg-type]


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def allowed(consent: consent_pb2_grpc.ConsentServiceStub, *identifiers: T.Identifier) -> bool:
    answer = consent.CheckConsent(
        C.CheckConsentRequest(
            subject=T.PersonRef(identifiers=list(identifiers)), purpose="analytics"
        ),
        timeout=10,
    )
    return answer.allowed


def eventually(condition: object, expected: bool, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition() is expected:  # type: ignore[operator]
            return
        time.sleep(0.05)
    assert condition() is expected  # type: ignore[operator]


def consent_changes(channel: grpc.Channel) -> list[tuple[str, str, bool]]:
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="consent", consumer="test", stop_at_end=True),
        timeout=10,
    )
    return [
        (change.person_id, change.purpose, change.allowed)
        for change in (
            r.envelope.consent_changed for r in log if r.envelope.HasField("consent_changed")
        )
    ]


def test_a_grant_follows_the_person_through_a_merge_and_back_on_unmerge(
    channel: grpc.Channel,
) -> None:
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    email, cookie = (
        ident(T.IDENTIFIER_TYPE_EMAIL, EMAIL),
        ident(T.IDENTIFIER_TYPE_COOKIE_ID, COOKIE),
    )
    # An anonymous browser first (the older person, so it survives the merge)...
    [browser] = identity.Resolve(
        L.ResolveRequest(items=[L.ResolveItem(identifiers=[cookie])], source="web"), timeout=10
    ).results
    # ...then a customer who grants analytics by email.
    policy = next(
        p.policy_version
        for p in consent.ListPurposes(C.ListPurposesRequest(), timeout=10).purposes
        if p.id == "analytics"
    )
    consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(identifiers=[email]),
            decisions=[
                C.DecisionInput(
                    purpose="analytics", decision=T.DECISION_GRANTED, policy_version=policy
                )
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            locale="en-GB",
            occurred_at=stamp(NOW - timedelta(minutes=5)),
        ),
        timeout=10,
    )
    assert allowed(consent, email) and not allowed(consent, cookie)

    # The customer logs in on that browser: identity merges the two persons.
    [joined] = identity.Resolve(
        L.ResolveRequest(items=[L.ResolveItem(identifiers=[cookie, email])], source="web"),
        timeout=10,
    ).results
    assert joined.person_id == browser.person_id and joined.merge_id
    eventually(lambda: allowed(consent, cookie), True)
    assert allowed(consent, email)
    # Tagging and recommend learn it from consent's log, under the person the group resolves to.
    eventually(lambda: (browser.person_id, "analytics", True) in consent_changes(channel), True)
    by_id = consent.CheckConsent(
        C.CheckConsentRequest(
            subject=T.PersonRef(person_id=browser.person_id), purpose="analytics"
        ),
        timeout=10,
    )
    assert by_id.allowed and by_id.ledger_seq > 0
    # Events of the merged person are kept under the grant.
    event = T.BehaviourEvent(
        event_id="ev-after-merge",
        type=T.EVENT_TYPE_VIEW,
        item_id="sku-1",
        channel="web",
        occurred_at=stamp(NOW),
        identifiers=[cookie],
    )
    [result] = consent.Collect(C.CollectRequest(events=[event]), timeout=10).results
    assert result.accepted and "analytics" in result.purposes

    # The operator undoes the merge: the browser is anonymous again, the customer keeps the grant.
    identity.Unmerge(L.UnmergeRequest(merge_id=joined.merge_id, reason="test"), timeout=10)
    eventually(lambda: allowed(consent, cookie), False)
    assert allowed(consent, email)
    changes = consent_changes(channel)
    assert changes[-1] == (browser.person_id, "analytics", False)
    assert changes.count((browser.person_id, "analytics", True)) == 1
