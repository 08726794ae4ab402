"""Consent folds the decisions of persons identity merged, and splits them when undone.

The merge tree itself is tested in tests/common/test_person_links.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.runtime import RunningSuite

C = consent_pb2
T = common_pb2
L = identity_pb2

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
