"""The suite as one system: a withdrawal, an erasure and an export each reach every service.

Each test runs the whole suite through the ``services.testing`` harness, on SQLite with the
embedded event log, on SQLite with the log on NATS JetStream, and on PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2
from steward.identity.v1 import identity_pb2
from steward.recommend.v1 import recommend_pb2
from steward.tagging.v1 import tagging_pb2

from services.common.config import SERVICE_DATABASES
from services.common.jetstream import delete_streams
from services.testing import StewardSuite, leaks, steward_suite
from services.testing.leaks import Needles
from tests.conftest import OUTDOOR_RULES, jetstream_environ

T = common_pb2
C = consent_pb2
A = audit_pb2
NOW = datetime.now(UTC)
POLICY = "2026-01"

PURPOSES = ("analytics", "personalisation", "profiling", "marketing")


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "embedded"), id="sqlite-embedded"),
        pytest.param(("postgres", "embedded"), id="postgres-embedded", marks=pytest.mark.postgres),
        pytest.param(
            ("postgres", "jetstream"),
            id="postgres-jetstream",
            marks=[pytest.mark.postgres, pytest.mark.nats],
        ),
    ]
)
def steward(request: pytest.FixtureRequest) -> Iterator[StewardSuite]:
    database, transport = request.param
    database_url = None
    environ: dict[str, str] = {}
    if database == "postgres":
        database_url = request.getfixturevalue("postgres_schema_url")
    if transport == "jetstream":
        nats_url: str = request.getfixturevalue("nats_url")
        prefix = f"t{uuid.uuid4().hex[:12]}"
        environ = jetstream_environ(nats_url, prefix)
        request.addfinalizer(
            lambda: delete_streams(nats_url, prefix, ("consent", "identity", "tagging"))
        )
    with steward_suite(database_url=database_url, environ=environ) as suite:
        suite.tagging.PutRuleSet(tagging_pb2.PutRuleSetRequest(yaml=OUTDOOR_RULES), timeout=10)
        suite.recommend.PutItems(
            recommend_pb2.PutItemsRequest(
                items=[
                    recommend_pb2.Item(item_id=f"tent-{n}", title=f"Tent {n}", category="outdoor")
                    for n in range(6)
                ]
            ),
            timeout=10,
        )
        yield suite


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def email(name: str) -> T.PersonRef:
    return T.PersonRef(
        identifiers=[T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"{name}@example.org")]
    )


def shopper(suite: StewardSuite, name: str) -> str:
    """A person who granted every purpose, then bought a tent and viewed two more."""
    person = suite.consent.RecordConsent(
        C.RecordConsentRequest(
            subject=email(name),
            decisions=[
                C.DecisionInput(purpose=p, decision=T.DECISION_GRANTED, policy_version=POLICY)
                for p in PURPOSES
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(NOW - timedelta(days=2)),
        ),
        timeout=10,
    ).person_id
    answer = suite.consent.Collect(
        C.CollectRequest(
            events=[
                T.BehaviourEvent(
                    event_id=f"{name}-{n}",
                    person_id=person,
                    type=T.EVENT_TYPE_PURCHASE if n == 0 else T.EVENT_TYPE_VIEW,
                    item_id=f"tent-{n}",
                    category="outdoor",
                    value=120.0 if n == 0 else 0.0,
                    channel="web",
                    occurred_at=stamp(NOW - timedelta(hours=5, minutes=n)),
                )
                for n in range(3)
            ]
        ),
        timeout=10,
    )
    assert answer.accepted == 3
    return person


def tags_of(suite: StewardSuite, person: str) -> list[str]:
    answer = suite.tagging.GetTags(tagging_pb2.GetTagsRequest(person_id=person), timeout=10)
    return sorted(tag.tag_id for tag in answer.tags)


def interactions_of(suite: StewardSuite, person: str) -> int:
    answer = suite.recommend.ExportPerson(
        recommend_pb2.ExportPersonRequest(person_id=person), timeout=10
    )
    return len(answer.interactions)


def ledger(suite: StewardSuite) -> list[audit_pb2.LedgerEntry]:
    return [
        item.entry
        for item in suite.audit.ExportLedger(A.ExportLedgerRequest(), timeout=10)
        if item.HasField("entry")
    ]


def propagation(suite: StewardSuite, name: str, purpose: str) -> C.WithdrawalPropagation:
    states = suite.consent.GetConsent(C.GetConsentRequest(subject=email(name)), timeout=10).states
    [state] = [s for s in states if s.purpose == purpose]
    return state.propagation


def test_a_withdrawal_reaches_tagging_and_recommend_and_the_ledger_says_when(
    steward: StewardSuite,
) -> None:
    ann = shopper(steward, "ann")
    steward.eventually(lambda: tags_of(steward, ann) == ["offer_reminder", "outdoor_fan"])
    steward.eventually(lambda: interactions_of(steward, ann) == 3)

    receipts = steward.consent.RecordConsent(
        C.RecordConsentRequest(
            subject=email("ann"),
            decisions=[
                C.DecisionInput(purpose=p, decision=T.DECISION_WITHDRAWN, policy_version=POLICY)
                for p in ("marketing", "personalisation")
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
        ),
        timeout=10,
    ).receipts
    withdrawals = {r.purpose: r.seq for r in receipts}

    # Tagging drops the marketing-gated tag only; recommend forgets the person.
    steward.eventually(lambda: tags_of(steward, ann) == ["outdoor_fan"])
    steward.eventually(lambda: interactions_of(steward, ann) == 0)
    done = steward.eventually(
        lambda: (p := propagation(steward, "ann", "marketing")).complete and p
    )
    assert {a.consumer for a in done.acknowledgements} == {"tagging", "recommend"}
    assert all(a.acknowledged_at.seconds > 0 for a in done.acknowledgements)

    entries = {entry.seq: entry for entry in ledger(steward)}
    propagated = entries[done.propagated_ledger_seq]
    assert propagated.kind == A.ENTRY_KIND_WITHDRAWAL_PROPAGATED
    assert propagated.purpose == "marketing"
    assert propagated.details["withdrawal_seq"] == str(withdrawals["marketing"])
    assert propagated.subject == entries[withdrawals["marketing"]].subject
    assert int(propagated.details["took_ms.tagging"]) >= 0
    assert int(propagated.details["took_ms.recommend"]) >= 0
    # Personalisation is followed on its own, to its own entry.
    other = steward.eventually(
        lambda: (p := propagation(steward, "ann", "personalisation")).complete and p
    )
    assert other.propagated_ledger_seq not in (0, done.propagated_ledger_seq)
    # A purpose still granted has nothing to propagate.
    assert not propagation(steward, "ann", "profiling").acknowledgements


def test_the_export_bundles_what_all_four_services_hold(steward: StewardSuite) -> None:
    ann = shopper(steward, "ann")
    steward.eventually(lambda: tags_of(steward, ann) == ["offer_reminder", "outdoor_fan"])
    steward.eventually(lambda: interactions_of(steward, ann) == 3)
    steward.tagging.ObjectToTag(
        tagging_pb2.ObjectToTagRequest(person_id=ann, tag_id="offer_reminder", reason="no"),
        timeout=10,
    )
    shown = steward.recommend.Recommend(
        recommend_pb2.RecommendRequest(person_id=ann, k=3), timeout=10
    )

    export = steward.consent.ExportSubjectData(
        C.ExportSubjectDataRequest(subject=email("ann")), timeout=10
    )
    bundle = export.bundle
    assert bundle.person_id == ann
    assert {r.purpose for r in bundle.consent_history} == set(PURPOSES)
    assert sorted(e.event_id for e in bundle.events) == ["ann-0", "ann-1", "ann-2"]
    assert bundle.identity.person_id == ann
    [identifier] = bundle.identity.identifiers
    assert identifier.hashed_value.count(":") == 1 and "@" not in identifier.hashed_value
    assert list(identifier.sources)
    assert [t.tag_id for t in bundle.tags.tags] == ["outdoor_fan"]
    assert all(t.condition and t.rule_id for t in bundle.tags.tags)
    assert [o.tag_id for o in bundle.tags.objections] == ["offer_reminder"]
    assert len(bundle.recommendations.interactions) == 3
    assert [s.impression_id for s in bundle.recommendations.shown] == [shown.impression_id]
    as_json = json.loads(export.json)
    assert as_json["tags"]["objections"][0]["tag_id"] == "offer_reminder"
    assert "ann@example.org" not in export.json


def rows_naming(suite: StewardSuite, needles: list[str]) -> list[tuple[str, str]]:
    """(database, table) of every row in any service's database that contains a needle."""
    databases = {name: suite.settings.db_url(name) for name in SERVICE_DATABASES}
    return sorted(leaks.rows_naming(databases, Needles.of(needles)))


def test_an_erasure_leaves_no_row_about_the_person_in_any_service(
    steward: StewardSuite,
) -> None:
    ann = shopper(steward, "ann")
    bea = shopper(steward, "bea")  # a second person, merged into ann: erased with her
    steward.eventually(lambda: interactions_of(steward, ann) == interactions_of(steward, bea) == 3)
    steward.recommend.Recommend(recommend_pb2.RecommendRequest(person_id=ann, k=3), timeout=10)
    merge = steward.identity.Merge(
        identity_pb2.MergeRequest(person_ids=[ann, bea], reason="same customer"), timeout=10
    ).merge
    assert merge.surviving_person_id == ann
    steward.eventually(lambda: interactions_of(steward, ann) == 6)
    identifiers = [
        i.hashed_value.split(":")[1]
        for i in steward.identity.GetPerson(
            identity_pb2.GetPersonRequest(person_id=ann), timeout=10
        ).person.identifiers
    ]
    assert len(identifiers) == 2

    erasure = steward.consent.EraseSubject(
        C.EraseSubjectRequest(subject=email("ann"), reason="ticket 7"), timeout=10
    ).erasure

    def finished() -> C.Erasure | None:
        report = steward.consent.GetErasure(
            C.GetErasureRequest(erasure_id=erasure.erasure_id), timeout=10
        ).erasure
        return report if report.state == C.ERASURE_STATE_DONE else None

    report = steward.eventually(finished)
    assert {s.service: s.state for s in report.services} == {
        "consent": C.ERASURE_STATE_DONE,
        "identity": C.ERASURE_STATE_DONE,
        "tagging": C.ERASURE_STATE_DONE,
        "recommend": C.ERASURE_STATE_DONE,
    }
    assert all(s.completed_at.seconds > 0 for s in report.services)
    assert report.completed_at.seconds > 0 and report.person_id == ""
    kinds = [entry.kind for entry in ledger(steward)]
    assert kinds.count(A.ENTRY_KIND_ERASURE_TOMBSTONE) == 1
    assert kinds[-1] == A.ENTRY_KIND_ERASURE_COMPLETED

    def nothing_left() -> bool:
        left = rows_naming(steward, [ann, bea, *identifiers])
        assert not left, left
        return True

    steward.eventually(nothing_left)
