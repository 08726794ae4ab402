"""An integration test another team writes against Steward, with the `steward` fixture.

`pip install steward` (or this repository) registers the fixture; nothing to import for it.
"""

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from steward.common.v1 import common_pb2 as common
from steward.consent.v1 import consent_pb2 as consent
from steward.tagging.v1 import tagging_pb2 as tagging


def at(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def test_a_consenting_shopper_is_collected_and_tagged(steward):
    steward.tagging.PutRuleSet(
        tagging.PutRuleSetRequest(
            yaml="""
tag_budget: 3
k_floor: 10
tags:
  - id: buyer
    category: value
    description: Bought something in the last 30 days
    condition: p.spend_30d > 0.0
    ttl: 30d
    priority: 1
"""
        ),
        timeout=10,
    )
    shopper = common.PersonRef(
        identifiers=[common.Identifier(type=common.IDENTIFIER_TYPE_EMAIL, value="ann@example.org")]
    )
    person = steward.consent.RecordConsent(
        consent.RecordConsentRequest(
            subject=shopper,
            decisions=[
                consent.DecisionInput(
                    purpose=purpose, decision=common.DECISION_GRANTED, policy_version="2026-01"
                )
                for purpose in ("analytics", "profiling")
            ],
            source=consent.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=at(datetime.now(UTC) - timedelta(days=1)),
        ),
        timeout=10,
    ).person_id

    collected = steward.consent.Collect(
        consent.CollectRequest(
            events=[
                common.BehaviourEvent(
                    event_id="order-1",
                    identifiers=shopper.identifiers,
                    type=common.EVENT_TYPE_PURCHASE,
                    item_id="sku-1",
                    category="outdoor",
                    value=42.0,
                    channel="web",
                    occurred_at=at(datetime.now(UTC) - timedelta(hours=1)),
                )
            ]
        ),
        timeout=10,
    )
    assert collected.accepted == 1

    # Tagging follows consent's event log in the background: wait for the tag to appear.
    def tags():
        answer = steward.tagging.GetTags(tagging.GetTagsRequest(person_id=person), timeout=10)
        return [tag.tag_id for tag in answer.tags] or None

    assert steward.eventually(tags) == ["buyer"]
