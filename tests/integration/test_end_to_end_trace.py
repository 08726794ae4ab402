"""One Collect call is one trace through consent, identity and the consumers' processing, with
the suite's metrics beside it, and no raw identifier in any span, metric or log line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2
from steward.recommend.v1 import recommend_pb2
from steward.tagging.v1 import tagging_pb2

from services.testing import StewardSuite, steward_suite

T = common_pb2
C = consent_pb2
EMAIL = "Trace.Shopper@Example.org"
PHONE = "+44 20 7946 0958"
DEVICE = "device-7f3a9c21-trace"
RAW = (EMAIL, EMAIL.lower(), "trace.shopper", PHONE, "+442079460958", "2079460958", DEVICE)
RULES = """
tag_budget: 5
k_floor: 10
tags:
  - id: outdoor_fan
    category: affinity
    description: Mostly browses outdoor gear
    condition: p.category_affinity["outdoor"] > 0.5
    ttl: 30d
    priority: 5
"""


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def metrics() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def steward(spans: InMemorySpanExporter, metrics: InMemoryMetricReader) -> Iterator[StewardSuite]:
    with steward_suite(span_exporter=spans, metric_reader=metrics) as suite:
        yield suite


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def identifiers() -> list[common_pb2.Identifier]:
    return [
        T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=EMAIL),
        T.Identifier(type=T.IDENTIFIER_TYPE_PHONE, value=PHONE),
        T.Identifier(type=T.IDENTIFIER_TYPE_DEVICE_ID, value=DEVICE),
    ]


def test_one_collect_is_one_trace_across_the_suite_and_names_nobody(
    steward: StewardSuite,
    spans: InMemorySpanExporter,
    metrics: InMemoryMetricReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    steward.tagging.PutRuleSet(tagging_pb2.PutRuleSetRequest(yaml=RULES), timeout=10)
    steward.recommend.PutItems(
        recommend_pb2.PutItemsRequest(
            items=[recommend_pb2.Item(item_id="tent-1", title="Tent", category="outdoor")]
        ),
        timeout=10,
    )
    steward.consent.RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(identifiers=identifiers()),
            decisions=[
                C.DecisionInput(purpose=p, decision=T.DECISION_GRANTED, policy_version="2026-01")
                for p in ("analytics", "profiling", "personalisation")
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(datetime.now(UTC) - timedelta(hours=1)),
        ),
        timeout=10,
    )
    spans.clear()

    answer = steward.consent.Collect(
        C.CollectRequest(
            events=[
                T.BehaviourEvent(
                    event_id="trace-1",
                    identifiers=identifiers(),
                    type=T.EVENT_TYPE_PURCHASE,
                    item_id="tent-1",
                    category="outdoor",
                    value=99.0,
                    channel="app",
                    occurred_at=stamp(datetime.now(UTC) - timedelta(minutes=1)),
                )
            ]
        ),
        timeout=10,
    )
    [result] = answer.results
    assert result.accepted, result

    def collect_trace() -> list[ReadableSpan] | None:
        finished = spans.get_finished_spans()
        [collect] = [s for s in finished if s.name.endswith("ConsentService/Collect")]
        trace_id = collect.context.trace_id
        in_trace = [s for s in finished if s.context.trace_id == trace_id]
        applied = {
            (s.attributes or {}).get("steward.consumer")
            for s in in_trace
            if s.name == "apply consent/behaviour_recorded"
        }
        return in_trace if {"tagging", "recommend"} <= applied else None

    trace = steward.eventually(collect_trace)
    names = {(s.name, s.kind) for s in trace}
    assert ("/steward.consent.v1.ConsentService/Collect", SpanKind.SERVER) in names
    # consent asked identity, as a client, and identity answered in the same trace
    assert ("/steward.identity.v1.IdentityService/Resolve", SpanKind.CLIENT) in names
    assert ("/steward.identity.v1.IdentityService/Resolve", SpanKind.SERVER) in names
    # one span per consumer that applied the envelope, carried by the envelope's trace context
    consumers = [s for s in trace if s.kind == SpanKind.CONSUMER]
    assert {(s.attributes or {}).get("steward.consumer") for s in consumers} >= {
        "tagging",
        "recommend",
    }
    # every span but the first descends from the Collect call
    [root] = [s for s in trace if s.parent is None]
    assert root.name == "/steward.consent.v1.ConsentService/Collect"

    # The suite's metrics: events by outcome, decisions, tag changes, recommendation latency.
    steward.eventually(
        lambda: (
            "outdoor_fan"
            in [
                t.tag_id
                for t in steward.tagging.GetTags(
                    tagging_pb2.GetTagsRequest(person_id=result.person_id), timeout=10
                ).tags
            ]
        )
    )
    steward.recommend.Recommend(
        recommend_pb2.RecommendRequest(person_id=result.person_id, k=1), timeout=10
    )
    data = metrics.get_metrics_data()
    assert data is not None
    points = {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert {
        "steward.consent.events",
        "steward.consent.decisions",
        "steward.tagging.tag_changes",
        "steward.recommend.latency",
    } <= set(points)
    assert any(p.attributes.get("outcome") == "accepted" for p in points["steward.consent.events"])
    assert {p.attributes.get("purpose") for p in points["steward.consent.decisions"]} >= {
        "profiling",
        "personalisation",
    }
    assert any(
        p.attributes.get("change") == "TAG_CHANGE_ASSIGNED"
        for p in points["steward.tagging.tag_changes"]
    )

    # Nothing that left the suite names the shopper: spans, metrics, log lines.
    exported = " ".join(
        f"{s.name} {dict(s.attributes or {})} {[dict(e.attributes or {}) for e in s.events]}"
        for s in spans.get_finished_spans()
    )
    logged = " ".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    measured = data.to_json()
    for raw in RAW:
        for text, where in ((exported, "spans"), (logged, "logs"), (measured, "metrics")):
            assert raw.lower() not in text.lower(), f"{raw!r} appears in the {where}"
