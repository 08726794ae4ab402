"""The tagging service in the whole suite: events through consent's log become explained tags,
held in check by consent, objections, the budget and the k floor."""

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
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.errors import read_error_details
from services.runtime import RunningSuite

T = common_pb2
C = consent_pb2
G = tagging_pb2
NOW = datetime.now(UTC)

RULES = """
tag_budget: 1
k_floor: 10
tags:
  - id: big_spender
    category: value
    description: Spent a lot recently
    condition: p.spend_90d >= 100.0
    ttl: 30d
    priority: 10
  - id: outdoor_fan
    category: affinity
    description: Mostly browses outdoor gear
    condition: p.category_affinity["outdoor"] > 0.5
    evidence_window: 30d
    ttl: 30d
    priority: 5
"""


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite]) -> RunningSuite:
    return start_services("consent", "identity", "tagging")


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def shopper(channel: grpc.Channel, name: str, purposes: dict[str, int]) -> str:
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    answer = consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(
                identifiers=[
                    T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"{name}@example.org")
                ]
            ),
            decisions=[
                C.DecisionInput(purpose=p, decision=d, policy_version="2026-01")  # type: ignore[arg-type]
                for p, d in purposes.items()
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(NOW - timedelta(days=10)),
        ),
        timeout=10,
    )
    events = [
        T.BehaviourEvent(
            event_id=f"{name}-{n}",
            person_id=answer.person_id,
            type=T.EVENT_TYPE_PURCHASE if n == 0 else T.EVENT_TYPE_VIEW,
            item_id=f"item-{n}",
            category="outdoor",
            value=150.0 if n == 0 else 0.0,
            channel="web",
            occurred_at=stamp(NOW - timedelta(days=1, minutes=n)),
        )
        for n in range(3)
    ]
    consent.Collect(C.CollectRequest(events=events), timeout=10)
    return answer.person_id


def tags_of(channel: grpc.Channel, person: str) -> tagging_pb2.GetTagsResponse:
    return tagging_pb2_grpc.TaggingServiceStub(channel).GetTags(
        G.GetTagsRequest(person_id=person), timeout=10
    )


def test_events_become_explained_tags_within_the_budget(channel: grpc.Channel) -> None:
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    stored = tagging.PutRuleSet(G.PutRuleSetRequest(yaml=RULES), timeout=10).rule_set
    assert stored.version == 1 and [r.id for r in stored.rules] == ["big_spender", "outdoor_fan"]
    assert [r.evidence_window for r in stored.rules] == ["90d", "30d"]
    person = shopper(channel, "ann", {"profiling": T.DECISION_GRANTED})
    eventually(lambda: len(tags_of(channel, person).tags) == 1)
    answer = tags_of(channel, person)
    [tag] = answer.tags
    assert tag.tag_id == "big_spender" and tag.condition == "p.spend_90d >= 100.0"
    assert tag.field_values["spend_90d"].number_value == 150.0
    assert tag.rule_set_version == 1 and tag.purpose == "profiling"
    assert [s.tag_id for s in answer.suppressed] == ["outdoor_fan"]
    profile = tagging.GetProfile(G.GetProfileRequest(person_id=person), timeout=10).profile
    assert profile.spend_90d == 150.0 and profile.lifecycle == "new"
    log = events_pb2_grpc.EventLogServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(producer="tagging", consumer="test", stop_at_end=True),
        timeout=10,
    )
    changes = [(r.envelope.tag_changed.tag_id, r.envelope.tag_changed.change) for r in log]
    assert ("big_spender", events_pb2.TAG_CHANGE_ASSIGNED) in changes
    assert ("outdoor_fan", events_pb2.TAG_CHANGE_SUPPRESSED) in changes


def test_no_tags_without_profiling_consent_and_withdrawal_removes_them(
    channel: grpc.Channel,
) -> None:
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    tagging.PutRuleSet(G.PutRuleSetRequest(yaml=RULES), timeout=10)
    without = shopper(channel, "bob", {"analytics": T.DECISION_GRANTED})
    person = shopper(channel, "cy", {"profiling": T.DECISION_GRANTED})
    eventually(lambda: len(tags_of(channel, person).tags) == 1)
    assert not tags_of(channel, without).tags
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(person_id=person),
            decisions=[
                C.DecisionInput(
                    purpose="profiling", decision=T.DECISION_WITHDRAWN, policy_version="2026-01"
                )
            ],
            source=C.CONSENT_SOURCE_APP,
        ),
        timeout=10,
    )
    eventually(lambda: not tags_of(channel, person).tags)
    with pytest.raises(grpc.RpcError) as raised:
        tagging.GetProfile(G.GetProfileRequest(person_id=person), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_objection_keeps_a_tag_off_for_good(channel: grpc.Channel) -> None:
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    tagging.PutRuleSet(
        G.PutRuleSetRequest(yaml=RULES.replace("tag_budget: 1", "tag_budget: 5")), timeout=10
    )
    person = shopper(channel, "dee", {"profiling": T.DECISION_GRANTED})
    eventually(lambda: len(tags_of(channel, person).tags) == 2)
    answer = tagging.ObjectToTag(
        G.ObjectToTagRequest(person_id=person, tag_id="big_spender", reason="no"), timeout=10
    )
    assert list(answer.removed_tag_ids) == ["big_spender"]
    after = tags_of(channel, person)
    assert [t.tag_id for t in after.tags] == ["outdoor_fan"]
    assert after.objections[0].tag_id == "big_spender"
    tagging.ObjectToTag(G.ObjectToTagRequest(person_id=person, all_profiling=True), timeout=10)
    assert not tags_of(channel, person).tags


def test_audience_is_refused_below_the_k_floor(channel: grpc.Channel) -> None:
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    tagging.PutRuleSet(G.PutRuleSetRequest(yaml=RULES), timeout=10)
    person = shopper(channel, "eve", {"profiling": T.DECISION_GRANTED})
    eventually(lambda: len(tags_of(channel, person).tags) == 1)
    with pytest.raises(grpc.RpcError) as raised:
        tagging.GetAudience(G.GetAudienceRequest(tag_id="big_spender"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fewer than 10" in (raised.value.details() or "")


def test_bad_rule_sets_are_refused_with_every_problem(channel: grpc.Channel) -> None:
    tagging = tagging_pb2_grpc.TaggingServiceStub(channel)
    bad = """
tags:
  - id: pregnant_shoppers
    category: health
    description: Probably expecting
    condition: p.no_such_field > 1
"""
    with pytest.raises(grpc.RpcError) as raised:
        tagging.PutRuleSet(G.PutRuleSetRequest(yaml=bad), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    problems = read_error_details(raised.value).field_violations
    assert any("condition" in field for field in problems)
    assert any("category" in field for field in problems)
    dry = tagging.ValidateRuleSet(G.ValidateRuleSetRequest(yaml=bad), timeout=10)
    assert not dry.valid and dry.errors
    good = tagging.ValidateRuleSet(G.ValidateRuleSetRequest(yaml=RULES), timeout=10)
    assert good.valid and [c.tag_id for c in good.coverage] == ["big_spender", "outdoor_fan"]
