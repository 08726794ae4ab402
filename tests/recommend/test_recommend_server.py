"""The recommend service in the whole suite: consented events through consent's log become
interactions that change the next answer at once, withdrawals forget, answers are diverse,
filtered, explained, and experiments assign persons stably."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2
from steward.identity.v1 import identity_pb2, identity_pb2_grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc

from services.common.db import make_engine
from services.common.errors import read_error_details
from services.common.migrations import upgrade
from services.recommend.evaluation import holdout_metrics
from services.recommend.interactions import build_interaction_matrix
from services.recommend.models import MODEL_NAMES, Catalogue, CatalogueItem, build_model
from services.recommend.service import Query, RecommendService, RecommendSettings
from services.recommend.store import target_metadata
from services.runtime import RunningSuite

T = common_pb2
C = consent_pb2
R = recommend_pb2
NOW = datetime.now(UTC)

CATALOGUE = [
    ("k1", "Red kettle", "kitchen", ["kettle", "red"], 30.0, True),
    ("k2", "Steel kettle", "kitchen", ["kettle", "steel"], 45.0, True),
    ("k3", "Red toaster", "kitchen", ["toaster", "red"], 35.0, True),
    ("k4", "Teapot", "kitchen", ["tea"], 20.0, False),
    ("g1", "Garden hose", "garden", ["hose"], 25.0, True),
    ("g2", "Rake", "garden", ["tools"], 15.0, True),
    ("g3", "Watering can", "garden", ["watering"], 12.0, True),
    ("b1", "Cook book", "books", ["cooking"], 18.0, True),
    ("b2", "Garden book", "books", ["gardening"], 22.0, True),
    ("b3", "Tea book", "books", ["tea"], 16.0, True),
]


@pytest.fixture
def suite(start_services: Callable[..., RunningSuite]) -> RunningSuite:
    return start_services("consent", "identity", "recommend")


@pytest.fixture
def channel(suite: RunningSuite) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(suite.target) as channel:
        yield channel


@pytest.fixture
def recommend(channel: grpc.Channel) -> recommend_pb2_grpc.RecommendServiceStub:
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    stub.PutItems(
        R.PutItemsRequest(
            items=[
                R.Item(item_id=i, title=t, category=c, tags=tags, price=p, available=available)
                for i, t, c, tags, p, available in CATALOGUE
            ]
        ),
        timeout=10,
    )
    return stub


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def person(channel: grpc.Channel, name: str, purpose: str = "personalisation") -> str:
    answer = consent_pb2_grpc.ConsentServiceStub(channel).RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(
                identifiers=[
                    T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=f"{name}@example.org")
                ]
            ),
            decisions=[
                C.DecisionInput(
                    purpose=purpose, decision=T.DECISION_GRANTED, policy_version="2026-01"
                )
            ],
            source=C.CONSENT_SOURCE_WEB_BANNER,
            occurred_at=stamp(NOW - timedelta(days=10)),
        ),
        timeout=10,
    )
    return answer.person_id


def view(channel: grpc.Channel, person_id: str, *item_ids: str) -> None:
    consent_pb2_grpc.ConsentServiceStub(channel).Collect(
        C.CollectRequest(
            events=[
                T.BehaviourEvent(
                    event_id=f"{person_id}-{item_id}-{time.monotonic_ns()}",
                    person_id=person_id,
                    type=T.EVENT_TYPE_VIEW,
                    item_id=item_id,
                    category="any",
                    channel="web",
                    occurred_at=stamp(NOW - timedelta(hours=1)),
                )
                for item_id in item_ids
            ]
        ),
        timeout=10,
    )


def held(stub: recommend_pb2_grpc.RecommendServiceStub, person_id: str) -> list[str]:
    export = stub.ExportPerson(R.ExportPersonRequest(person_id=person_id), timeout=10)
    return [i.item_id for i in export.interactions]


def test_without_a_personalisation_grant_nothing_is_kept_or_personalised(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    outsider = person(channel, "olga", purpose="analytics")
    view(channel, outsider, "k1", "k2")
    marker = person(channel, "mark")
    view(channel, marker, "g1")
    eventually(lambda: held(recommend, marker) == ["g1"])  # the log got past olga's events
    assert held(recommend, outsider) == []
    answer = recommend.Recommend(R.RecommendRequest(person_id=outsider, k=5), timeout=30)
    assert not answer.personalised and answer.model == "popular" and len(answer.items) == 5
    assert recommend.Recommend(R.RecommendRequest(person_id=marker), timeout=30).personalised


def test_a_new_event_changes_the_next_answer_without_training(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    shopper = person(channel, "ann")
    request = R.RecommendRequest(person_id=shopper, k=4, model="hybrid")
    eventually(lambda: recommend.Recommend(request, timeout=30).personalised)
    before = recommend.Recommend(request, timeout=30)
    assert not any("Red kettle" in item.reason.text for item in before.items)
    view(channel, shopper, "k1")
    eventually(lambda: held(recommend, shopper) == ["k1"])
    after = recommend.Recommend(request, timeout=30)
    assert after.model_version == before.model_version  # no retraining happened
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]
    explained = [i for i in after.items if "k1" in i.reason.contributing_item_ids]
    assert explained and "Red kettle" in explained[0].reason.text
    assert "k1" not in [i.item_id for i in after.items]  # what was just viewed is not repeated
    export = recommend.ExportPerson(R.ExportPersonRequest(person_id=shopper), timeout=10)
    assert [s.impression_id for s in export.shown][:1] == [after.impression_id]


def test_withdrawal_deletes_interactions_at_once_and_models_forget_on_rebuild(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    shopper = person(channel, "bea")
    view(channel, shopper, "k1", "k2", "b1")
    eventually(lambda: len(held(recommend, shopper)) == 3)
    trained = recommend.Train(R.TrainRequest(wait=True), timeout=60)
    hybrid = next(m for m in trained.models if m.name == "hybrid")
    assert hybrid.state == R.MODEL_STATE_READY and hybrid.persons == 1
    consent_pb2_grpc.ConsentServiceStub(channel).RecordConsent(
        C.RecordConsentRequest(
            subject=T.PersonRef(person_id=shopper),
            decisions=[
                C.DecisionInput(
                    purpose="personalisation",
                    decision=T.DECISION_WITHDRAWN,
                    policy_version="2026-01",
                )
            ],
            source=C.CONSENT_SOURCE_APP,
        ),
        timeout=10,
    )
    eventually(lambda: held(recommend, shopper) == [])
    info = recommend.GetModelInfo(R.GetModelInfoRequest(), timeout=10)
    assert info.pending_forgets == 1
    deadline = info.forget_deadline.ToDatetime(tzinfo=UTC)
    assert datetime.now(UTC) < deadline <= datetime.now(UTC) + timedelta(seconds=601)
    answer = recommend.Recommend(R.RecommendRequest(person_id=shopper), timeout=30)
    assert not answer.personalised
    recommend.Train(R.TrainRequest(wait=True), timeout=60)
    info = recommend.GetModelInfo(R.GetModelInfoRequest(models=["hybrid"]), timeout=10)
    assert info.pending_forgets == 0 and info.models[0].persons == 0


def test_filters_hold_and_full_diversity_never_repeats_a_category_while_others_qualify(
    recommend: recommend_pb2_grpc.RecommendServiceStub,
) -> None:
    answer = recommend.Recommend(
        R.RecommendRequest(session_item_ids=["k1"], k=3, diversity=1.0), timeout=30
    )
    assert not answer.personalised
    assert sorted(i.category for i in answer.items) == ["books", "garden", "kitchen"]
    focused = recommend.Recommend(
        R.RecommendRequest(session_item_ids=["k1"], k=3, diversity=0.0), timeout=30
    )
    assert [i.category for i in focused.items].count("kitchen") >= 2
    assert all(i.reason.text for i in focused.items)
    filtered = recommend.Recommend(
        R.RecommendRequest(
            k=10,
            filters=R.RecommendFilters(
                categories=["kitchen", "garden"],
                max_price=40.0,
                exclude_item_ids=["g1"],
                available_only=True,
            ),
        ),
        timeout=30,
    )
    assert sorted(i.item_id for i in filtered.items) == ["g2", "g3", "k1", "k3"]
    need = recommend.Recommend(R.RecommendRequest(need="a kettle please", k=2), timeout=30)
    assert {i.item_id for i in need.items} == {"k1", "k2"}
    assert all(i.reason.kind == R.REASON_KIND_MATCHES_NEED for i in need.items)


def test_experiment_assignment_is_stable_and_feedback_credits_the_arm(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    recommend.PutExperiment(
        R.PutExperimentRequest(
            experiment=R.Experiment(
                experiment_id="exp-1",
                salt="s1",
                active=True,
                arms=[
                    R.ExperimentArm(name="a", model="popular", traffic_share=0.5),
                    R.ExperimentArm(name="b", model="item_knn", traffic_share=0.5),
                ],
            )
        ),
        timeout=10,
    )
    shopper = person(channel, "cat")
    view(channel, shopper, "g1")
    eventually(lambda: held(recommend, shopper) == ["g1"])
    answers = [
        recommend.Recommend(R.RecommendRequest(person_id=shopper), timeout=30) for _ in range(3)
    ]
    arms = {a.experiment_arm for a in answers}
    assert len(arms) == 1 and arms <= {"a", "b"}
    [arm] = arms
    assert answers[0].model == {"a": "popular", "b": "item_knn"}[arm]
    first = answers[0]
    credited = recommend.RecordFeedback(
        R.RecordFeedbackRequest(
            impression_id=first.impression_id,
            item_id=first.items[0].item_id,
            type=R.FEEDBACK_TYPE_CLICK,
        ),
        timeout=10,
    )
    assert credited.experiment_arm == arm
    stats = {s.arm: s for s in recommend.GetModelInfo(R.GetModelInfoRequest(), timeout=10).arms}
    assert stats[arm].impressions == 3 and stats[arm].clicks == 1
    assert stats[arm].click_through_rate == pytest.approx(1 / 3)
    with pytest.raises(grpc.RpcError) as raised:
        recommend.RecordFeedback(
            R.RecordFeedbackRequest(impression_id="nope", item_id="k1", type=R.FEEDBACK_TYPE_CLICK),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_requests_name_every_field(
    recommend: recommend_pb2_grpc.RecommendServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        recommend.PutItems(
            R.PutItemsRequest(
                items=[R.Item(item_id="x", price=-1.0), R.Item(item_id="", title="no id")]
            ),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = read_error_details(raised.value).field_violations
    assert "items[0].price" in fields and "items[1].item_id" in fields
    with pytest.raises(grpc.RpcError) as raised:
        recommend.Recommend(
            R.RecommendRequest(
                k=101,
                diversity=1.5,
                model="magic",
                filters=R.RecommendFilters(min_price=10.0, max_price=5.0),
            ),
            timeout=10,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = read_error_details(raised.value).field_violations
    assert {"k", "diversity", "model", "filters.max_price"} <= set(fields)


def test_a_forget_past_its_deadline_rebuilds_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "recommend")
        service = RecommendService(engine, RecommendSettings(forget_delay_seconds=0.0))
        service.put_items([CatalogueItem("k1", "Kettle", "kitchen")], [None])
        seen = events_pb2.BehaviourRecorded(
            person_id="p1",
            event_id="e1",
            type=T.EVENT_TYPE_VIEW,
            item_id="k1",
            occurred_at=stamp(NOW),
            purposes=["personalisation"],
        )
        withdrawn = events_pb2.ConsentChanged(person_id="p1", purpose="personalisation")
        with engine.begin() as connection:
            service.apply_consent_envelope(connection, events_pb2.Envelope(behaviour_recorded=seen))
        service.train([])
        assert service.model_info(["popular"]).models[0].model.report.persons == 1  # type: ignore[union-attr]
        with engine.begin() as connection:
            service.apply_consent_envelope(
                connection, events_pb2.Envelope(consent_changed=withdrawn)
            )
        assert service.model_info([]).pending_forgets == 1
        assert service.rebuild_due_forgets()
        info = service.model_info(["popular"])
        assert info.pending_forgets == 0 and info.models[0].model.report.persons == 0  # type: ignore[union-attr]
        assert not service.rebuild_due_forgets()
    finally:
        engine.dispose()


def test_putting_the_same_items_again_leaves_the_models_and_a_change_retrains_them(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "recommend")
        service = RecommendService(engine, RecommendSettings(evaluation_persons=0))
        items = [CatalogueItem("k1", "Kettle", "kitchen"), CatalogueItem("t1", "Tent", "outdoor")]
        service.put_items(items, [None, None])
        service.train([])

        def versions() -> dict[str, str]:
            return {
                m.name: m.model.report.version  # type: ignore[union-attr]
                for m in service.model_info([]).models
                if m.model is not None
            }

        trained = versions()
        service.put_items(items, [None, None])
        time.sleep(0.5)
        assert versions() == trained  # nothing to learn: no retraining
        service.put_items([CatalogueItem("k1", "Kettle", "kitchen", price=25.0)], [None])
        eventually(lambda: all(versions()[name] != trained[name] for name in trained))
    finally:
        service.stop()
        engine.dispose()


# Merges, erasure and forgetting through the logs ------------------------------------------------


def popular_persons(stub: recommend_pb2_grpc.RecommendServiceStub) -> int:
    info = stub.GetModelInfo(R.GetModelInfoRequest(models=["popular"]), timeout=10)
    return info.models[0].persons


def test_a_merge_folds_histories_and_an_unmerge_splits_them(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    ann, bob = person(channel, "ann.m"), person(channel, "bob.m")
    view(channel, ann, "k1")
    view(channel, bob, "g1", "g2")
    eventually(
        lambda: held(recommend, ann) == ["k1"] and sorted(held(recommend, bob)) == ["g1", "g2"]
    )
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    merged = identity.Merge(
        identity_pb2.MergeRequest(person_ids=[ann, bob], reason="same customer"), timeout=10
    ).merge
    survivor, [absorbed] = merged.surviving_person_id, list(merged.absorbed_person_ids)
    assert {survivor, absorbed} == {ann, bob}
    eventually(lambda: sorted(held(recommend, survivor)) == ["g1", "g2", "k1"])
    assert held(recommend, absorbed) == []
    answer = recommend.Recommend(R.RecommendRequest(person_id=survivor, k=10), timeout=30)
    assert answer.personalised
    shown = [item.item_id for item in answer.items]
    assert not {"k1", "g1", "g2"} & set(shown)  # the folded history counts as seen
    contributing = {i for item in answer.items for i in item.reason.contributing_item_ids}
    assert contributing & {"g1", "g2"} and contributing & {"k1"}  # both histories explain

    identity.Unmerge(
        identity_pb2.UnmergeRequest(merge_id=merged.merge_id, reason="two people"), timeout=10
    )
    own = {ann: ["k1"], bob: ["g1", "g2"]}
    eventually(lambda: sorted(held(recommend, absorbed)) == own[absorbed])
    assert sorted(held(recommend, survivor)) == own[survivor]


def test_an_unmerge_after_a_later_merge_takes_the_interactions_back_from_the_new_holder(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    zed = person(channel, "zed.m")  # the oldest: it survives every merge
    ann, bob = person(channel, "ann.l"), person(channel, "bob.l")
    view(channel, zed, "b1")
    view(channel, ann, "k1")
    view(channel, bob, "g1", "g2")
    eventually(lambda: sorted(held(recommend, bob)) == ["g1", "g2"])
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    first = identity.Merge(
        identity_pb2.MergeRequest(person_ids=[ann, bob], reason="same customer"), timeout=10
    ).merge
    identity.Merge(
        identity_pb2.MergeRequest(person_ids=[zed, first.surviving_person_id], reason="again"),
        timeout=10,
    )
    eventually(lambda: sorted(held(recommend, zed)) == ["b1", "g1", "g2", "k1"])

    identity.Unmerge(
        identity_pb2.UnmergeRequest(merge_id=first.merge_id, reason="two people"), timeout=10
    )
    [restored] = list(first.absorbed_person_ids)
    own = {ann: ["k1"], bob: ["g1", "g2"]}
    eventually(lambda: sorted(held(recommend, restored)) == own[restored])
    assert sorted(held(recommend, zed)) == sorted(["b1", *own[first.surviving_person_id]])


def test_erasure_deletes_interactions_at_once_and_their_influence_on_rebuild(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    gone, stays = person(channel, "eve.e"), person(channel, "sam.e")
    view(channel, gone, "k1", "k2", "b1")
    view(channel, stays, "g1", "k1")
    eventually(lambda: len(held(recommend, gone)) == 3 and len(held(recommend, stays)) == 2)
    recommend.Train(R.TrainRequest(wait=True), timeout=60)
    first = recommend.Recommend(R.RecommendRequest(person_id=gone), timeout=30)
    assert first.personalised and popular_persons(recommend) == 2

    consent_pb2_grpc.ConsentServiceStub(channel).EraseSubject(
        C.EraseSubjectRequest(subject=T.PersonRef(person_id=gone), reason="ticket 42"), timeout=30
    )
    eventually(lambda: held(recommend, gone) == [])
    export = recommend.ExportPerson(R.ExportPersonRequest(person_id=gone), timeout=10)
    assert not export.interactions and not export.shown  # the answers shown to them too
    assert not recommend.Recommend(R.RecommendRequest(person_id=gone), timeout=30).personalised
    # Popularity, the non-personalised answer, stops counting them within a check...
    eventually(lambda: popular_persons(recommend) == 1)
    info = recommend.GetModelInfo(R.GetModelInfoRequest(models=["hybrid"]), timeout=10)
    assert info.pending_forgets >= 1 and info.models[0].persons == 2
    # ... and a rebuild removes them from every model.
    recommend.Train(R.TrainRequest(wait=True), timeout=60)
    info = recommend.GetModelInfo(R.GetModelInfoRequest(), timeout=10)
    assert info.pending_forgets == 0
    assert {m.name: m.persons for m in info.models if m.persons} == {
        name: 1 for name in ("content", "ease", "hybrid", "item_knn", "popular")
    }
    assert sorted(held(recommend, stays)) == ["g1", "k1"]


def test_get_model_info_reports_offline_metrics_measured_at_training(
    channel: grpc.Channel, recommend: recommend_pb2_grpc.RecommendServiceStub
) -> None:
    shoppers = [person(channel, f"val{n}") for n in range(4)]
    for n, shopper in enumerate(shoppers):
        view(channel, shopper, *(["k1", "k2", "k3"] if n % 2 else ["g1", "g2", "g3"]))
    eventually(lambda: all(len(held(recommend, shopper)) == 3 for shopper in shoppers))
    recommend.Train(R.TrainRequest(wait=True), timeout=60)
    info = recommend.GetModelInfo(R.GetModelInfoRequest(models=["item_knn", "hybrid"]), timeout=10)
    for model in info.models:
        assert model.metrics["validation_persons"] == 4
        for name in ("precision@10", "recall@10", "f1@10", "ndcg@10", "map@10", "hit_rate@10"):
            assert 0.0 <= model.metrics[name] <= 1.0
        assert model.metrics["hit_rate@10"] == 1.0  # ten items: whatever is held out is listed
        assert model.metrics["coverage"] > 0 and model.metrics["novelty"] > 0


# The service on its database (both backends), with a fixed clock ---------------------------------

CLOCK = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FORGET_AT_ONCE = RecommendSettings(forget_delay_seconds=0.0)
SHOP = [
    CatalogueItem(f"{group}{n}", f"{group} item {n}", group, (group,), 10.0 + n)
    for group in ("a", "b", "c")
    for n in range(6)
]


def behaviour(
    person_id: str, item_id: str, n: int, kind: int = T.EVENT_TYPE_VIEW
) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        behaviour_recorded=events_pb2.BehaviourRecorded(
            person_id=person_id,
            event_id=f"{person_id}-{item_id}-{n}",
            type=kind,  # type: ignore[arg-type]
            item_id=item_id,
            occurred_at=stamp(CLOCK - timedelta(days=n % 20)),
            purposes=["personalisation"],
        )
    )


def grant(person_id: str, allowed: bool = True) -> events_pb2.Envelope:
    return events_pb2.Envelope(
        consent_changed=events_pb2.ConsentChanged(
            person_id=person_id, purpose="personalisation", allowed=allowed
        )
    )


def shoppers(count: int) -> list[tuple[str, list[str]]]:
    """Persons who each stay inside one group of items (a planted structure)."""
    result = []
    for n in range(count):
        group = "abc"[n % 3]
        items = [f"{group}{(n + step) % 6}" for step in range(3 + n % 3)]
        result.append((f"p{n:03d}", items))
    return result


def fed_service(
    db_url: str,
    persons: list[tuple[str, list[str]]],
    settings: RecommendSettings = FORGET_AT_ONCE,
) -> tuple[RecommendService, Engine]:
    """A service on the database at a fixed time, fed the persons' grants and events as
    consent's log would (first event of each a purchase)."""
    engine = make_engine(db_url)
    upgrade(engine, "recommend")
    with engine.begin() as connection:
        for table in target_metadata.sorted_tables:
            connection.execute(delete(table))
    service = RecommendService(engine, settings, clock=lambda: CLOCK)
    service.put_items(SHOP, [None] * len(SHOP))
    with engine.begin() as connection:
        for person_id, items in persons:
            service.apply_consent_envelope(connection, grant(person_id))
            for n, item_id in enumerate(items):
                kind = T.EVENT_TYPE_PURCHASE if n == 0 else T.EVENT_TYPE_VIEW
                service.apply_consent_envelope(connection, behaviour(person_id, item_id, n, kind))
    return service, engine


def answers(service: RecommendService, person_id: str) -> dict[str, list[tuple[str, float, str]]]:
    return {
        name: [
            (item.item_id, item.score, item.reason.text)
            for item in service.recommend(Query(person_id=person_id, k=6, model=name)).items
        ]
        for name in MODEL_NAMES
    }


@pytest.mark.parametrize("how", ["erasure", "withdrawal", "identity forget"])
def test_forgetting_through_the_service_equals_never_having_known_the_person(
    db_url: str, how: str
) -> None:
    everyone = shoppers(12)
    forgotten, kept = everyone[0][0], everyone[1:]
    with_them, engine = fed_service(db_url, everyone)
    try:
        with_them.train([])
        before = {s.name: s.model.report.version for s in with_them.statuses([]) if s.model}
        envelope = {
            "erasure": events_pb2.Envelope(
                subject_erased=events_pb2.SubjectErased(person_id=forgotten)
            ),
            "withdrawal": grant(forgotten, allowed=False),
            "identity forget": events_pb2.Envelope(
                person_forgotten=events_pb2.PersonForgotten(person_id=forgotten)
            ),
        }[how]
        with engine.begin() as connection:
            if how == "identity forget":
                with_them.apply_identity_envelope(connection, envelope)
            else:
                with_them.apply_consent_envelope(connection, envelope)
        assert with_them.export_person(forgotten).interactions == []
        assert with_them.model_info([]).pending_forgets == 1
        assert with_them.rebuild_due_forgets()
        after = {s.name: s.model for s in with_them.statuses([]) if s.model}
        assert after and all(after[name].report.version != before[name] for name in after)
        remembered = answers(with_them, kept[0][0])
    finally:
        with_them.stop()
        engine.dispose()

    # A second service on the emptied database, that never heard of the person.
    without, engine = fed_service(db_url, kept)
    try:
        without.train([])
        never = {s.name: s.model for s in without.statuses([]) if s.model}
        assert set(never) == set(after)
        for name, model in after.items():
            assert model.report.version == never[name].report.version, name
            theirs = never[name].arrays()
            for key, array in model.arrays().items():
                assert np.array_equal(array, theirs[key]), (name, key)
        assert answers(without, kept[0][0]) == remembered
    finally:
        without.stop()
        engine.dispose()


def test_metrics_at_training_come_from_the_evaluation_protocol(db_url: str) -> None:
    persons = shoppers(30)
    settings = RecommendSettings(forget_delay_seconds=0.0, evaluation_k=3)
    service, engine = fed_service(db_url, persons, settings)
    try:
        service.train([])
        statuses = {s.name: s for s in service.statuses([])}
        catalogue = Catalogue(SHOP)
        data = build_interaction_matrix(
            [
                (person_id, item_id, 8.0 if n == 0 else 1.0, CLOCK - timedelta(days=n % 20))
                for person_id, items in persons
                for n, item_id in enumerate(items)
            ],
            catalogue,
            now=CLOCK,
            half_life_days=30.0,
        )
        expected, measured = holdout_metrics(build_model("item_knn"), data, catalogue, k=3)
        knn = statuses["item_knn"].metrics
        assert knn["validation_persons"] == measured == 30
        assert {name: knn[f"{name}@3"] for name in ("precision", "recall", "ndcg", "hit_rate")} == {
            name: expected[name] for name in ("precision", "recall", "ndcg", "hit_rate")
        }
        assert knn["coverage"] == expected["coverage"]
        # The planted groups: neighbours find a person's held-out item, popularity does not.
        assert knn["hit_rate@3"] > statuses["popular"].metrics["hit_rate@3"]
        assert statuses["hybrid"].metrics["ndcg@3"] > statuses["popular"].metrics["ndcg@3"]
    finally:
        service.stop()
        engine.dispose()


def test_no_metrics_are_reported_when_evaluation_is_off(db_url: str) -> None:
    settings = RecommendSettings(evaluation_persons=0)
    service, engine = fed_service(db_url, shoppers(9), settings)
    try:
        service.train([])
        assert all(not s.metrics for s in service.statuses([]))
    finally:
        service.stop()
        engine.dispose()
