"""gRPC servicer of the recommend service: validates requests, maps them onto the use cases,
and runs the consumers of consent's and identity's event logs and the forget rebuilds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Final

import grpc
from opentelemetry import metrics
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc

from services.common.config import Settings
from services.common.consumer import Consumer, start_log_consumers
from services.common.context import PeerChannels, ServiceContext, ServiceParts
from services.common.db import make_engine
from services.common.errors import FieldViolations, InvalidArgument
from services.common.migrations import upgrade
from services.common.server import ServiceRegistration
from services.common.times import INVALID_MOMENT, moment_of, timestamp
from services.recommend.models import MODEL_NAMES, CatalogueItem
from services.recommend.ranking import Filters, ReasonKind
from services.recommend.service import (
    ArmSpec,
    ExperimentSpec,
    ModelState,
    ModelStatus,
    Query,
    RecommendService,
)
from services.recommend.store import CONSUMER_TABLES

R = recommend_pb2
MAX_ID: Final = 128
MAX_TEXT: Final = 1024
MAX_TAGS: Final = 50
MAX_ITEMS_PER_CALL: Final = 1000
MAX_K: Final = 100
MAX_SESSION: Final = 200
MAX_ARMS: Final = 20

_REASONS: Final = {
    ReasonKind.BECAUSE_YOU_INTERACTED: R.REASON_KIND_BECAUSE_YOU_INTERACTED,
    ReasonKind.POPULAR: R.REASON_KIND_POPULAR,
    ReasonKind.POPULAR_IN_CATEGORY: R.REASON_KIND_POPULAR_IN_CATEGORY,
    ReasonKind.MATCHES_NEED: R.REASON_KIND_MATCHES_NEED,
    ReasonKind.SIMILAR_CONTENT: R.REASON_KIND_SIMILAR_CONTENT,
}
_STATES: Final = {
    ModelState.UNTRAINED: R.MODEL_STATE_UNTRAINED,
    ModelState.TRAINING: R.MODEL_STATE_TRAINING,
    ModelState.READY: R.MODEL_STATE_READY,
    ModelState.FAILED: R.MODEL_STATE_FAILED,
}
_FEEDBACK: Final = {
    R.FEEDBACK_TYPE_CLICK: "click",
    R.FEEDBACK_TYPE_CART: "cart",
    R.FEEDBACK_TYPE_PURCHASE: "purchase",
    R.FEEDBACK_TYPE_DISMISS: "dismiss",
}


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _model_names(names: Sequence[str], violations: FieldViolations, path: str) -> None:
    for position, name in enumerate(names):
        violations.check(
            name in MODEL_NAMES, f"{path}[{position}]", f"one of {', '.join(MODEL_NAMES)}"
        )


def _model_message(status: ModelStatus) -> recommend_pb2.ModelInfo:
    message = R.ModelInfo(name=status.name, state=_STATES[status.state])
    if status.model is not None:
        report = status.model.report
        message.version = report.version
        message.items = report.items
        message.persons = report.persons
        message.interactions = report.interactions
        message.size_bytes = report.size_bytes
        message.training_time.FromNanoseconds(int(report.training_seconds * 1e9))
        measured = {**report.details, **status.metrics}
        message.metrics.update(
            {k: float(v) for k, v in measured.items() if math.isfinite(float(v))}
        )
    if status.trained_at is not None:
        message.trained_at.FromDatetime(status.trained_at)
    return message


def _experiment_message(experiment: ExperimentSpec) -> recommend_pb2.Experiment:
    return R.Experiment(
        experiment_id=experiment.experiment_id,
        salt=experiment.salt,
        active=experiment.active,
        arms=[
            R.ExperimentArm(
                name=arm.name,
                model=arm.model,
                parameters=dict(arm.parameters),
                traffic_share=arm.traffic_share,
            )
            for arm in experiment.arms
        ],
    )


def _person_id(value: str, violations: FieldViolations) -> None:
    violations.check(len(value) <= 64, "person_id", "at most 64 characters")


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    """steward.recommend.v1.RecommendService."""

    def __init__(self, service: RecommendService, meter: metrics.Meter | None = None) -> None:
        self._service = service
        self._latency = (
            None
            if meter is None
            else meter.create_histogram(
                "steward.recommend.latency",
                unit="ms",
                description="Time to answer Recommend, by model and whether it was personalised",
            )
        )

    def PutItems(
        self, request: recommend_pb2.PutItemsRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.PutItemsResponse:
        violations = FieldViolations()
        violations.check(
            0 < len(request.items) <= MAX_ITEMS_PER_CALL, "items", "1 to 1,000 items per call"
        )
        seen: set[str] = set()
        for n, item in enumerate(request.items):
            path = f"items[{n}]"
            violations.check(
                0 < len(item.item_id) <= MAX_ID, f"{path}.item_id", "1 to 128 characters"
            )
            violations.check(item.item_id not in seen, f"{path}.item_id", "given twice")
            seen.add(item.item_id)
            violations.check(len(item.title) <= MAX_TEXT, f"{path}.title", "at most 1024 chars")
            violations.check(len(item.category) <= 256, f"{path}.category", "at most 256 chars")
            violations.check(len(item.tags) <= MAX_TAGS, f"{path}.tags", "at most 50 tags")
            violations.check(
                all(0 < len(tag) <= MAX_ID for tag in item.tags),
                f"{path}.tags",
                "each tag 1 to 128 characters",
            )
            violations.check(
                _finite(item.price) and item.price >= 0, f"{path}.price", "finite, not negative"
            )
        violations.raise_if_any()
        items = [
            CatalogueItem(
                item_id=item.item_id,
                title=item.title,
                category=item.category,
                tags=tuple(item.tags),
                price=item.price,
                available=item.available,
            )
            for item in request.items
        ]
        created = [
            moment_of(item.created_at) if item.HasField("created_at") else None
            for item in request.items
        ]
        violations = FieldViolations()
        for index, (item, moment) in enumerate(zip(request.items, created, strict=True)):
            if moment is None and item.HasField("created_at"):
                violations.add(f"items[{index}].created_at", INVALID_MOMENT)
        violations.raise_if_any()
        return R.PutItemsResponse(upserted=self._service.put_items(items, created))

    def Recommend(
        self, request: recommend_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.RecommendResponse:
        violations = FieldViolations()
        _person_id(request.person_id, violations)
        violations.check(0 <= request.k <= MAX_K, "k", "1 to 100 (0 for the default of 10)")
        violations.check(
            _finite(request.diversity) and 0.0 <= request.diversity <= 1.0,
            "diversity",
            "between 0 and 1",
        )
        violations.check(
            len(request.session_item_ids) <= MAX_SESSION, "session_item_ids", "at most 200"
        )
        violations.check(
            all(0 < len(i) <= MAX_ID for i in request.session_item_ids),
            "session_item_ids",
            "each 1 to 128 characters",
        )
        violations.check(len(request.need) <= MAX_TEXT, "need", "at most 1024 characters")
        violations.check(
            not request.model or request.model in MODEL_NAMES,
            "model",
            f"empty or one of {', '.join(MODEL_NAMES)}",
        )
        given = request.filters
        low = given.min_price if given.HasField("min_price") else None
        high = given.max_price if given.HasField("max_price") else None
        for name, bound in (("min_price", low), ("max_price", high)):
            if bound is not None:
                violations.check(
                    _finite(bound) and bound >= 0, f"filters.{name}", "finite, not negative"
                )
        if low is not None and high is not None:
            violations.check(low <= high, "filters.max_price", "at least min_price")
        violations.check(len(given.categories) <= 100, "filters.categories", "at most 100")
        violations.check(
            len(given.exclude_item_ids) <= 1000, "filters.exclude_item_ids", "at most 1,000"
        )
        violations.raise_if_any()
        started = time.perf_counter()
        answer = self._service.recommend(
            Query(
                person_id=request.person_id,
                session_item_ids=tuple(request.session_item_ids),
                need=request.need,
                k=request.k or 10,
                filters=Filters(
                    categories=tuple(given.categories),
                    min_price=low,
                    max_price=high,
                    exclude_item_ids=tuple(given.exclude_item_ids),
                    available_only=given.available_only,
                    include_purchased=given.include_purchased,
                ),
                diversity=request.diversity,
                model=request.model,
            )
        )
        if self._latency is not None:
            self._latency.record(
                (time.perf_counter() - started) * 1000.0,
                {"model": answer.model, "personalised": answer.personalised},
            )
        response = R.RecommendResponse(
            personalised=answer.personalised,
            experiment_arm=answer.experiment_arm,
            impression_id=answer.impression_id,
            model=answer.model,
            model_version=answer.model_version,
        )
        # Filled in place: building each message and then copying it into the list costs more.
        add = response.items.add
        for item in answer.items:
            entry = add(
                item_id=item.item_id,
                score=item.score,
                model=answer.model,
                title=item.title,
                category=item.category,
            )
            given_reason, reason = item.reason, entry.reason
            reason.kind = _REASONS[given_reason.kind]
            reason.text = given_reason.text
            reason.contributing_item_ids.extend(given_reason.contributing_item_ids)
            reason.category = given_reason.category
        return response

    def RecordFeedback(
        self, request: recommend_pb2.RecordFeedbackRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.RecordFeedbackResponse:
        violations = FieldViolations()
        violations.check(
            0 < len(request.impression_id) <= 40, "impression_id", "an impression id is required"
        )
        violations.check(0 < len(request.item_id) <= MAX_ID, "item_id", "1 to 128 characters")
        violations.check(request.type in _FEEDBACK, "type", "click, cart, purchase or dismiss")
        occurred = moment_of(request.occurred_at) if request.HasField("occurred_at") else None
        violations.check(
            occurred is not None or not request.HasField("occurred_at"),
            "occurred_at",
            INVALID_MOMENT,
        )
        violations.raise_if_any()
        arm = self._service.record_feedback(
            request.impression_id, request.item_id, _FEEDBACK[request.type], occurred
        )
        return R.RecordFeedbackResponse(experiment_arm=arm)

    def Train(
        self, request: recommend_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.TrainResponse:
        violations = FieldViolations()
        _model_names(request.models, violations, "models")
        violations.raise_if_any()
        names = list(request.models)
        if request.wait:
            job_id, statuses = self._service.train(names)
        else:
            job_id, statuses = self._service.train_in_background(names)
        return R.TrainResponse(job_id=job_id, models=[_model_message(s) for s in statuses])

    def GetModelInfo(
        self, request: recommend_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.GetModelInfoResponse:
        violations = FieldViolations()
        _model_names(request.models, violations, "models")
        violations.raise_if_any()
        info = self._service.model_info(list(request.models))
        return R.GetModelInfoResponse(
            models=[_model_message(s) for s in info.models],
            arms=[
                R.ArmStats(
                    arm=a.arm,
                    model=a.model,
                    traffic_share=a.traffic_share,
                    impressions=a.impressions,
                    clicks=a.clicks,
                    carts=a.carts,
                    purchases=a.purchases,
                    click_through_rate=a.clicks / a.impressions if a.impressions else 0.0,
                    conversion_rate=a.purchases / a.impressions if a.impressions else 0.0,
                )
                for a in info.arms
            ],
            pending_forgets=info.pending_forgets,
            forget_deadline=timestamp(info.forget_deadline),
        )

    def PutExperiment(
        self, request: recommend_pb2.PutExperimentRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.PutExperimentResponse:
        given = request.experiment
        violations = FieldViolations()
        violations.check(
            0 < len(given.experiment_id) <= MAX_ID,
            "experiment.experiment_id",
            "1 to 128 characters",
        )
        violations.check(len(given.salt) <= MAX_ID, "experiment.salt", "at most 128 characters")
        violations.check(0 < len(given.arms) <= MAX_ARMS, "experiment.arms", "1 to 20 arms")
        names: set[str] = set()
        total = 0.0
        for n, arm in enumerate(given.arms):
            path = f"experiment.arms[{n}]"
            violations.check(0 < len(arm.name) <= MAX_ID, f"{path}.name", "1 to 128 characters")
            violations.check(arm.name not in names, f"{path}.name", "given twice")
            names.add(arm.name)
            violations.check(
                arm.model in MODEL_NAMES, f"{path}.model", f"one of {', '.join(MODEL_NAMES)}"
            )
            violations.check(
                _finite(arm.traffic_share) and 0.0 <= arm.traffic_share <= 1.0,
                f"{path}.traffic_share",
                "between 0 and 1",
            )
            total += arm.traffic_share if _finite(arm.traffic_share) else 0.0
        if given.arms:
            violations.check(
                abs(total - 1.0) <= 1e-6, "experiment.arms", "traffic shares must sum to 1"
            )
        violations.raise_if_any()
        experiment = ExperimentSpec(
            experiment_id=given.experiment_id,
            salt=given.salt or given.experiment_id,
            arms=tuple(
                ArmSpec(arm.name, arm.model, dict(arm.parameters), arm.traffic_share)
                for arm in given.arms
            ),
            active=given.active,
        )
        stored = self._service.put_experiment(experiment)
        return R.PutExperimentResponse(experiment=_experiment_message(stored))

    def ExportPerson(
        self, request: recommend_pb2.ExportPersonRequest, context: grpc.ServicerContext
    ) -> recommend_pb2.ExportPersonResponse:
        if not request.person_id or len(request.person_id) > 64:
            raise InvalidArgument({"person_id": "is required (at most 64 characters)"})
        export = self._service.export_person(request.person_id)
        return R.ExportPersonResponse(
            person_id=request.person_id,
            interactions=[
                R.Interaction(
                    item_id=item_id, event_type=kind, weight=weight, occurred_at=timestamp(at)
                )
                for item_id, kind, weight, at in export.interactions
            ],
            shown=[
                R.ShownRecommendation(
                    impression_id=impression_id, item_ids=items, shown_at=timestamp(at), model=model
                )
                for impression_id, items, at, model in export.shown
            ],
        )


def migrate(settings: Settings) -> None:
    """Bring recommend's database to the newest schema: ``build`` does so before serving,
    ``steward migrate`` once for a whole deployment."""
    upgrade(settings.db_url("recommend"), "recommend")


def build(context: ServiceContext) -> ServiceParts:
    """The recommend service on its database (migrated first), consuming consent's and
    identity's logs, and rebuilding models when pending forgets reach their deadline."""
    migrate(context.settings)
    engine = make_engine(context.settings.db_url("recommend"))
    service = RecommendService(engine)
    consumers: list[Consumer] = []
    channels: list[PeerChannels] = []

    def start_consumers(own_target: str) -> None:
        # Each log from its producer: this process, or where the settings say it runs.
        peers = PeerChannels(context.settings, own_target)
        channels.append(peers)
        feeds: Sequence[tuple[str, Callable[..., None]]] = (
            ("consent", service.apply_consent_envelope),
            ("identity", service.apply_identity_envelope),
        )

        consumers.extend(
            start_log_consumers(
                "recommend",
                feeds,
                peers.to,
                engine,
                tables=CONSUMER_TABLES,
                tracer_provider=context.telemetry.tracer_provider,
                sources=context.envelope_sources,
            )
        )
        service.start()

    def stop() -> None:
        service.stop()
        for consumer in consumers:
            consumer.stop()
        for channel in channels:
            channel.close()
        engine.dispose()

    return ServiceParts(
        [
            ServiceRegistration(
                "steward.recommend.v1.RecommendService",
                recommend_pb2_grpc.add_RecommendServiceServicer_to_server,
                RecommendServicer(service, context.telemetry.meter("steward.recommend")),
            )
        ],
        on_start=[start_consumers],
        on_stop=[stop],
    )
