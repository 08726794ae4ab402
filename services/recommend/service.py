"""The recommend service's use cases: the catalogue, consented interactions kept from the event
logs, training and atomic swaps of models, recommendations read against the person's history at
request time, experiments, feedback, export, and forgetting.

Real time: a model scores a history given at request time, so a new interaction changes the next
answer without retraining. Forgetting: a withdrawal or erasure deletes the person's interactions
at once (their next answer is no longer personal) and records a pending forget; the models, which
still hold the person's influence, are rebuilt without them within ``forget_delay_seconds``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.person_links import handed_back
from services.common.times import utc, utc_now
from services.recommend.evaluation import PER_PERSON, holdout_metrics
from services.recommend.impressions import ImpressionWriter
from services.recommend.interactions import (
    EventType,
    InteractionSettings,
    build_interaction_matrix,
    history_of,
)
from services.recommend.models import (
    MODEL_NAMES,
    Catalogue,
    CatalogueItem,
    EASEConfig,
    EASEModel,
    HybridConfig,
    HybridModel,
    Model,
    TrainedModel,
    build_model,
)
from services.recommend.models.base import (
    History,
    IntArray,
    InteractionMatrix,
    parse_parameters,
)
from services.recommend.people import PersonRecord, PersonView
from services.recommend.ranking import Filters, Ranker, Recommendation
from services.recommend.store import (
    PERSON_LINKS,
    consents_table,
    experiments_table,
    feedback_table,
    forgets_table,
    impressions_table,
    interactions_table,
    items_table,
)

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime]

PERSONALISATION: Final = "personalisation"
DEFAULT_MODEL: Final = "hybrid"
FEEDBACK_TYPES: Final = ("click", "cart", "purchase", "dismiss")

_EVENT_TYPES: Final[Mapping[int, str]] = {
    common_pb2.EVENT_TYPE_VIEW: EventType.VIEW,
    common_pb2.EVENT_TYPE_DWELL: EventType.DWELL,
    common_pb2.EVENT_TYPE_SEARCH_CLICK: EventType.SEARCH_CLICK,
    common_pb2.EVENT_TYPE_ADD_TO_CART: EventType.ADD_TO_CART,
    common_pb2.EVENT_TYPE_PURCHASE: EventType.PURCHASE,
}


_NO_ITEMS: Final = np.zeros(0, dtype=np.int64)


def settle_heap() -> None:
    """Collect what training (or loading) left, then keep the models and the person view out
    of the cyclic collector's reach, as `steward serve` does with what start-up allocated.

    Without it every full collection walks them again while the serving threads wait on the
    GIL: 0.15-0.2 s of CPU here, longer on a loaded machine (the likely cause of the stall once
    seen in bench/recommend.py). Objects frozen are still freed by reference counting when a
    later snapshot replaces them.
    """
    gc.collect()
    gc.freeze()


class ModelState:
    UNTRAINED: Final = "untrained"
    TRAINING: Final = "training"
    READY: Final = "ready"
    FAILED: Final = "failed"


@dataclass(frozen=True)
class RecommendSettings:
    """How interactions are weighed, how soon forgets are rebuilt away, and what trains.

    EASE inverts an items x items matrix, so it trains only on catalogues of at most
    ``ease_max_items`` items, with a fixed λ (``ease_l2``) rather than a grid search.

    After training, each model is measured offline (`evaluation.holdout_metrics`, the protocol of
    ``steward eval``): retrained without a seeded 20% of the items of up to
    ``evaluation_persons`` persons, it ranks every item for them and is scored on the held-out
    items at ``evaluation_k``. ``evaluation_persons=0`` skips it.
    """

    interactions: InteractionSettings = field(default_factory=InteractionSettings)
    forget_delay_seconds: float = 600.0
    forget_check_seconds: float = 1.0
    ease_max_items: int = 5_000
    ease_l2: float = 100.0
    recent_impressions: int = 50
    experiment_cache_seconds: float = 1.0
    evaluation_persons: int = 2_000
    evaluation_k: int = 10
    evaluation_seed: int = 0


@dataclass(frozen=True)
class ArmSpec:
    name: str
    model: str
    parameters: Mapping[str, str]
    traffic_share: float


@dataclass(frozen=True)
class ExperimentSpec:
    experiment_id: str
    salt: str
    arms: tuple[ArmSpec, ...]
    active: bool


@dataclass(frozen=True)
class Query:
    """One Recommend request, validated."""

    person_id: str = ""
    session_item_ids: tuple[str, ...] = ()
    need: str = ""
    k: int = 10
    filters: Filters = field(default_factory=Filters)
    diversity: float = 0.0
    model: str = ""


@dataclass(frozen=True)
class Answer:
    items: list[Recommendation]
    personalised: bool
    experiment_arm: str
    impression_id: str
    model: str
    model_version: str


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str
    model: TrainedModel | None
    trained_at: datetime | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Offline metrics of the serving version, from a validation split at training time."""


@dataclass(frozen=True)
class ArmStats:
    arm: str
    model: str
    traffic_share: float
    impressions: int
    clicks: int
    carts: int
    purchases: int


@dataclass(frozen=True)
class ModelInfo:
    models: list[ModelStatus]
    arms: list[ArmStats]
    pending_forgets: int
    forget_deadline: datetime | None


@dataclass(frozen=True)
class PersonExport:
    interactions: list[tuple[str, str, float, datetime]]
    """(item id, event type, weight, occurred at)."""
    shown: list[tuple[str, list[str], datetime, str]]
    """(impression id, item ids, shown at, model)."""


@dataclass(frozen=True)
class Snapshot:
    """Models trained together on one catalogue, swapped in as a whole."""

    catalogue: Catalogue
    ranker: Ranker
    models: Mapping[str, TrainedModel]
    trained_at: Mapping[str, datetime]


def assign_arm(person_id: str, salt: str, arms: Sequence[ArmSpec]) -> ArmSpec | None:
    """The person's arm: a salted SHA-256 of the id, read as a point in [0, 1), placed on the
    arms' cumulative traffic shares. The same person and salt always land in the same arm."""
    if not arms:
        return None
    digest = hashlib.sha256(f"{salt}\x00{person_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for arm in arms:
        cumulative += arm.traffic_share
        if point < cumulative:
            return arm
    return arms[-1]


def arm_model_key(experiment_id: str, arm: str) -> str:
    return f"arm:{experiment_id}:{arm}"


class RecommendService:
    """Catalogue, interactions, models and experiments over the recommend database."""

    def __init__(
        self,
        engine: Engine,
        settings: RecommendSettings | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.engine = engine
        self.settings = settings or RecommendSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._train_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._states: dict[str, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._experiment: tuple[float, ExperimentSpec | None] | None = None
        self._evaluations: dict[str, tuple[str, dict[str, float]]] = {}
        self.impressions = ImpressionWriter(engine)
        self.people = PersonView(engine)

    # Consumers -----------------------------------------------------------------------------------

    def apply_consent_envelope(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        body = envelope.WhichOneof("body")
        if body == "behaviour_recorded":
            self._behaviour(connection, envelope.behaviour_recorded)
        elif body == "consent_changed":
            self._consent(connection, envelope.consent_changed)
        elif body == "subject_erased":
            erased = envelope.subject_erased
            persons = [erased.person_id, *erased.alias_person_ids]
            PERSON_LINKS.forget(connection, persons)
            self.forget(connection, persons)

    def apply_identity_envelope(
        self, connection: Connection, envelope: events_pb2.Envelope
    ) -> None:
        body = envelope.WhichOneof("body")
        if body == "persons_merged":
            merged = envelope.persons_merged
            PERSON_LINKS.apply(connection, envelope)
            self.people.writing(
                connection, [merged.surviving_person_id, *merged.absorbed_person_ids]
            )
            connection.execute(
                update(interactions_table)
                .where(interactions_table.c.person_id.in_(list(merged.absorbed_person_ids)))
                .values(person_id=merged.surviving_person_id)
            )
        elif body == "person_unmerged":
            split = envelope.person_unmerged
            # The survivor may have been merged into another person since, who then holds the
            # interactions handed back: the restored person's own and those of the persons
            # merged into it before (a merge older than the links table: its own, from the
            # survivor).
            holder = PERSON_LINKS.root_of(connection, split.surviving_person_id)
            change = PERSON_LINKS.apply(connection, envelope)
            self.people.writing(
                connection, [split.restored_person_id, split.surviving_person_id, holder]
            )
            back = handed_back(
                change,
                split,
                interactions_table.c.origin_person_id,
                interactions_table.c.person_id,
            )
            connection.execute(
                update(interactions_table).where(back).values(person_id=split.restored_person_id)
            )
        elif body == "person_forgotten":
            forgotten = envelope.person_forgotten
            persons = [forgotten.person_id, *forgotten.alias_person_ids]
            PERSON_LINKS.forget(connection, persons)
            self.forget(connection, persons)

    def _behaviour(self, connection: Connection, event: events_pb2.BehaviourRecorded) -> None:
        if PERSONALISATION not in event.purposes or not event.item_id:
            return
        event_type = _EVENT_TYPES.get(event.type)
        if event_type is None:
            return
        weight = self.settings.interactions.weight(event_type, event.dwell_ms / 1000.0)
        if weight <= 0:
            return
        dialect = _dialect(connection)
        now = self.clock()
        self.people.writing(connection, [event.person_id])
        connection.execute(
            dialect.insert(items_table).on_conflict_do_nothing(  # type: ignore[attr-defined]
                index_elements=[items_table.c.item_id]
            ),
            {
                "item_id": event.item_id,
                "title": "",
                "category": event.category,
                "tags": [],
                "price": 0.0,
                "available": False,
                "stub": True,
                "created_at": now,
                "updated_at": now,
            },
        )
        connection.execute(
            dialect.insert(interactions_table).on_conflict_do_nothing(  # type: ignore[attr-defined]
                index_elements=[interactions_table.c.event_id]
            ),
            {
                "event_id": event.event_id,
                "person_id": event.person_id,
                "origin_person_id": event.person_id,
                "item_id": event.item_id,
                "event_type": str(event_type),
                "weight": weight,
                "dwell_ms": event.dwell_ms,
                "occurred_at": event.occurred_at.ToDatetime(tzinfo=UTC),
            },
        )

    def _consent(self, connection: Connection, change: events_pb2.ConsentChanged) -> None:
        if change.purpose != PERSONALISATION:
            return
        expires_at = (
            change.expires_at.ToDatetime(tzinfo=UTC) if change.HasField("expires_at") else None
        )
        values = {
            "person_id": change.person_id,
            "allowed": change.allowed,
            "expires_at": expires_at,
            "ledger_seq": change.ledger_seq,
        }
        self.people.writing(connection, [change.person_id])
        statement = _dialect(connection).insert(consents_table).values(**values)  # type: ignore[attr-defined]
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=[consents_table.c.person_id],
                set_={k: v for k, v in values.items() if k != "person_id"},
            )
        )
        if not change.allowed:
            self.impressions.forget([change.person_id], erase=False)
            removed = connection.execute(
                delete(interactions_table).where(interactions_table.c.person_id == change.person_id)
            ).rowcount
            connection.execute(
                update(impressions_table)
                .where(impressions_table.c.person_id == change.person_id)
                .values(person_id="")
            )
            if removed:
                self._pending_forget(connection, [change.person_id])

    def forget(self, connection: Connection, person_ids: Sequence[str]) -> None:
        """Delete everything about the persons; the models forget them at the next rebuild."""
        persons = [p for p in person_ids if p]
        if not persons:
            return
        self.impressions.forget(persons, erase=True)
        self.people.writing(connection, persons)
        holders = connection.execute(
            delete(interactions_table)
            .where(
                or_(
                    interactions_table.c.person_id.in_(persons),
                    interactions_table.c.origin_person_id.in_(persons),
                )
            )
            .returning(interactions_table.c.person_id)
        ).all()
        # Interactions collected for them may belong to a survivor of a merge by now.
        self.people.writing(connection, {row.person_id for row in holders})
        removed = len(holders)
        connection.execute(delete(consents_table).where(consents_table.c.person_id.in_(persons)))
        connection.execute(
            delete(impressions_table).where(impressions_table.c.person_id.in_(persons))
        )
        if removed:
            self._pending_forget(connection, persons)

    def _pending_forget(self, connection: Connection, persons: Iterable[str]) -> None:
        now = self.clock()
        due = now + timedelta(seconds=self.settings.forget_delay_seconds)
        connection.execute(
            insert(forgets_table),
            [
                {"forget_id": uuid.uuid4().hex, "requested_at": now, "due_at": due}
                for _person in dict.fromkeys(persons)
            ],
        )

    # Catalogue -----------------------------------------------------------------------------------

    def put_items(self, items: Sequence[CatalogueItem], created: Sequence[datetime | None]) -> int:
        """Create or update items (a stub becomes a real item); retrains in the background when
        models already serve and the catalogue they read changed, so new items become
        recommendable."""
        now = self.clock()
        rows = [
            {
                "item_id": item.item_id,
                "title": item.title,
                "category": item.category,
                "tags": list(item.tags),
                "price": item.price,
                "available": item.available,
                "stub": False,
                "created_at": at or now,
                "updated_at": now,
            }
            for item, at in zip(items, created, strict=True)
        ]
        with self.engine.begin() as connection:
            statement = _dialect(connection).insert(items_table)  # type: ignore[attr-defined]
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[items_table.c.item_id],
                    set_={
                        name: getattr(statement.excluded, name)
                        for name in (
                            "title",
                            "category",
                            "tags",
                            "price",
                            "available",
                            "stub",
                            "updated_at",
                        )
                    },
                ),
                rows,
            )
        current = self._snapshot
        if current is not None:
            with self.engine.connect() as connection:
                catalogue = self._catalogue(connection)
            unchanged = (
                catalogue.item_ids == current.catalogue.item_ids
                and catalogue.fingerprint() == current.catalogue.fingerprint()
                and bool((catalogue.available == current.catalogue.available).all())
            )
            if not unchanged:  # the same items put again leave the models as they are
                self.train_in_background([])
        return len(rows)

    def _catalogue(self, connection: Connection) -> Catalogue:
        return Catalogue(
            CatalogueItem(
                item_id=row.item_id,
                title=row.title,
                category=row.category,
                tags=tuple(row.tags or ()),
                price=float(row.price),
                available=bool(row.available) and not row.stub,
            )
            for row in connection.execute(select(items_table))
        )

    # Training ------------------------------------------------------------------------------------

    def _model_names(self, catalogue: Catalogue) -> list[str]:
        names = ["popular", "item_knn", "content", "hybrid"]
        if len(catalogue) <= self.settings.ease_max_items:
            names.insert(2, "ease")
        return names

    def _model(self, name: str, parameters: Mapping[str, str] | None = None) -> Model:
        """The named model; EASE (alone or in the hybrid) with a fixed λ and a bounded size."""
        given = dict(parameters or {})
        if name == "ease":
            given.setdefault("l2", str(self.settings.ease_l2))
            ease: EASEConfig = parse_parameters(EASEConfig, given)
            return EASEModel(self._bounded(ease))
        if name == "hybrid":
            hybrid: HybridConfig = parse_parameters(HybridConfig, given)
            ease = EASEConfig(l2=self.settings.ease_l2)
            return HybridModel(dataclasses.replace(hybrid, ease=self._bounded(ease)))
        return build_model(name, given)

    def _bounded(self, config: EASEConfig) -> EASEConfig:
        return dataclasses.replace(
            config, l2_grid=(), max_items=min(config.max_items, self.settings.ease_max_items)
        )

    def train(self, names: Sequence[str]) -> tuple[str, list[ModelStatus]]:
        """Rebuild models now (all of them when the catalogue changed); returns the job id."""
        job_id = uuid.uuid4().hex
        self._train(names, job_id)
        return job_id, self.statuses(())

    def train_in_background(self, names: Sequence[str]) -> tuple[str, list[ModelStatus]]:
        job_id = uuid.uuid4().hex
        with self._lock:
            for name in names or self._states or MODEL_NAMES:
                if name in MODEL_NAMES or name.startswith("arm:"):
                    self._states[name] = ModelState.TRAINING
        thread = threading.Thread(
            target=self._train_quietly, args=(list(names), job_id), daemon=True
        )
        thread.start()
        return job_id, self.statuses(())

    def _train_quietly(self, names: Sequence[str], job_id: str) -> None:
        try:
            self._train(names, job_id)
        except Exception:
            logger.exception("training job %s failed", job_id)

    def _train(self, names: Sequence[str], job_id: str) -> None:
        with self._train_lock:
            now = self.clock()
            with self.engine.connect() as connection:
                catalogue = self._catalogue(connection)
                rows = connection.execute(
                    select(
                        interactions_table.c.person_id,
                        interactions_table.c.item_id,
                        interactions_table.c.weight,
                        interactions_table.c.occurred_at,
                    )
                ).all()
                forgotten = list(connection.execute(select(forgets_table.c.forget_id)).scalars())
                experiment = self._active_experiment(connection)
            wanted = self._model_names(catalogue)
            for arm in experiment.arms if experiment else ():
                if arm.parameters:
                    wanted.append(arm_model_key(experiment.experiment_id, arm.name))  # type: ignore[union-attr]
            current = self._snapshot
            same_catalogue = (
                current is not None
                and current.catalogue.fingerprint() == catalogue.fingerprint()
                and current.catalogue.item_ids == catalogue.item_ids
                and bool((current.catalogue.available == catalogue.available).all())
            )
            chosen = [n for n in wanted if not names or n in names]
            if not same_catalogue:
                chosen = wanted
            with self._lock:
                for name in chosen:
                    self._states[name] = ModelState.TRAINING
            data = build_interaction_matrix(
                ((r.person_id, r.item_id, r.weight, utc(r.occurred_at)) for r in rows),
                catalogue,
                now=now,
                half_life_days=self.settings.interactions.half_life_days,
            )
            trained: dict[str, TrainedModel] = {}
            failed: list[str] = []
            for name in chosen:
                try:
                    trained[name] = self._build(name, experiment).train(data, catalogue)
                except Exception:
                    logger.exception("training %s failed (job %s)", name, job_id)
                    failed.append(name)
            finished = self.clock()
            with self._lock:
                keep = current.models if current is not None and same_catalogue else {}
                models = {k: v for k, v in keep.items() if k in wanted}
                models.update(trained)
                times = dict(current.trained_at) if current is not None and same_catalogue else {}
                times.update({name: finished for name in trained})
                ranker = current.ranker if current is not None and same_catalogue else None
                self._snapshot = Snapshot(
                    catalogue, ranker or Ranker(catalogue), models, {k: times[k] for k in models}
                )
                for name in trained:
                    self._states[name] = ModelState.READY
                for name in failed:
                    self._states[name] = ModelState.FAILED
                for name, state in list(self._states.items()):
                    if state == ModelState.TRAINING and name not in chosen:
                        # Marked by a background request, but not trainable on this catalogue.
                        self._states[name] = (
                            ModelState.READY if name in models else ModelState.UNTRAINED
                        )
            if forgotten and set(models) <= set(trained):
                with self.engine.begin() as connection:
                    connection.execute(
                        delete(forgets_table).where(forgets_table.c.forget_id.in_(forgotten))
                    )
            for name, model in trained.items():
                self._evaluate(name, model, data, catalogue, experiment)
        del rows, data
        settle_heap()

    def _evaluate(
        self,
        name: str,
        model: TrainedModel,
        data: InteractionMatrix,
        catalogue: Catalogue,
        experiment: ExperimentSpec | None,
    ) -> None:
        """Offline metrics for a model just swapped in (it serves meanwhile)."""
        settings = self.settings
        if settings.evaluation_persons <= 0:
            return
        started = time.perf_counter()
        try:
            measured, persons = holdout_metrics(
                self._build(name, experiment),
                data,
                catalogue,
                k=settings.evaluation_k,
                seed=settings.evaluation_seed,
                persons=settings.evaluation_persons,
            )
        except Exception:
            logger.exception("evaluating %s failed", name)
            return
        k = settings.evaluation_k
        metrics = {
            f"{metric}@{k}" if metric in PER_PERSON else metric: value
            for metric, value in measured.items()
        }
        metrics["validation_persons"] = float(persons)
        metrics["evaluation_seconds"] = time.perf_counter() - started
        with self._lock:
            self._evaluations[name] = (model.report.version, metrics)

    def _build(self, name: str, experiment: ExperimentSpec | None) -> Model:
        if name.startswith("arm:") and experiment is not None:
            for arm in experiment.arms:
                if arm_model_key(experiment.experiment_id, arm.name) == name:
                    return self._model(arm.model, arm.parameters)
        return self._model(name)

    def _ready(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            self._train([], uuid.uuid4().hex)
            snapshot = self._snapshot
        if snapshot is None:  # pragma: no cover - training always leaves a snapshot
            raise FailedPrecondition([("MODEL", "models", "no model could be trained")])
        return snapshot

    def rebuild_due_forgets(self) -> bool:
        """Rebuild every model when a pending forget has reached its deadline."""
        with self.engine.connect() as connection:
            due = connection.execute(
                select(func.count()).where(forgets_table.c.due_at <= self.clock())
            ).scalar_one()
        if not due:
            return False
        self._train([], uuid.uuid4().hex)
        return True

    def refresh_popularity_after_forgets(self) -> bool:
        """Retrain popularity when a person was forgotten since it was trained.

        Popularity is the non-personalised answer and a few milliseconds to train, so a forgotten
        person stops counting in it within a check (``forget_check_seconds``), long before the
        other models are rebuilt without them. Driven by the committed forget rows, so it never
        reads the interactions before their deletion is visible.
        """
        if self._snapshot is None:
            return False  # nothing trained yet: the first training reads the data as it is
        with self.engine.connect() as connection:
            latest = connection.execute(select(func.max(forgets_table.c.requested_at))).scalar()
        if latest is None:
            return False
        trained_at = self.statuses(["popular"])[0].trained_at
        if trained_at is not None and trained_at >= utc(latest):
            return False
        self._train(["popular"], uuid.uuid4().hex)
        return True

    def start(self) -> None:
        """Load every person's grant and interactions into memory (until then requests read
        them from the database), and run the periodic checks of pending forgets: popularity at
        once, the rest when due."""

        def load() -> None:
            try:
                started = time.perf_counter()
                persons = self.people.load()
                if self._stop.is_set():
                    return  # stopped meanwhile (outwaited by stop's join): nobody to tell
                settle_heap()
                logger.info(
                    "recommend: %d persons in memory in %.1f s",
                    persons,
                    time.perf_counter() - started,
                )
            except Exception:
                if not self._stop.is_set():
                    logger.exception("loading persons into memory failed; reading them singly")

        loader = threading.Thread(target=load, name="recommend-people", daemon=True)
        self._threads.append(loader)
        loader.start()

        def loop() -> None:
            while not self._stop.wait(self.settings.forget_check_seconds):
                try:
                    if not self.rebuild_due_forgets():
                        self.refresh_popularity_after_forgets()
                except Exception:
                    logger.exception("rebuilding for pending forgets failed")

        thread = threading.Thread(target=loop, name="recommend-forgets", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self.impressions.stop()
        self.people.close()

    # Queries -------------------------------------------------------------------------------------

    def statuses(self, names: Sequence[str]) -> list[ModelStatus]:
        with self._lock:
            snapshot = self._snapshot
            models = dict(snapshot.models) if snapshot is not None else {}
            times = dict(snapshot.trained_at) if snapshot is not None else {}
            states = dict(self._states)
            evaluations = dict(self._evaluations)
        listed = list(names) or sorted(set(MODEL_NAMES) | set(models) | set(states))
        statuses = []
        for name in listed:
            model = models.get(name)
            version, metrics = evaluations.get(name, ("", {}))
            statuses.append(
                ModelStatus(
                    name,
                    states.get(
                        name, ModelState.READY if model is not None else ModelState.UNTRAINED
                    ),
                    model,
                    times.get(name),
                    metrics if model is not None and model.report.version == version else {},
                )
            )
        return statuses

    def model_info(self, names: Sequence[str]) -> ModelInfo:
        self.impressions.flush()
        with self.engine.connect() as connection:
            pending, deadline = connection.execute(
                select(func.count(), func.min(forgets_table.c.due_at))
            ).one()
            experiment = self._active_experiment(connection)
            arms: list[ArmStats] = []
            if experiment is not None:
                shown: dict[str, int] = dict(
                    connection.execute(
                        select(impressions_table.c.arm, func.count())
                        .where(impressions_table.c.experiment_id == experiment.experiment_id)
                        .group_by(impressions_table.c.arm)
                    ).all()
                )
                counts: dict[tuple[str, str], int] = {
                    (arm, kind): int(count)
                    for arm, kind, count in connection.execute(
                        select(feedback_table.c.arm, feedback_table.c.type, func.count())
                        .where(feedback_table.c.experiment_id == experiment.experiment_id)
                        .group_by(feedback_table.c.arm, feedback_table.c.type)
                    )
                }
                arms = [
                    ArmStats(
                        arm.name,
                        arm.model,
                        arm.traffic_share,
                        int(shown.get(arm.name, 0)),
                        counts.get((arm.name, "click"), 0),
                        counts.get((arm.name, "cart"), 0),
                        counts.get((arm.name, "purchase"), 0),
                    )
                    for arm in experiment.arms
                ]
        return ModelInfo(
            self.statuses(names),
            arms,
            int(pending),
            None if deadline is None else utc(deadline),
        )

    def recommend(self, query: Query) -> Answer:
        snapshot = self._ready()
        catalogue = snapshot.catalogue
        now = self.clock()
        arm: ArmSpec | None = None
        experiment: ExperimentSpec | None = None
        personalised = False
        record: PersonRecord | None = None
        if query.person_id:
            record = self.people.get(query.person_id)
            personalised = record is not None and self._grant_holds(
                record.allowed, record.expires_at
            )
            if personalised and not query.model:
                experiment = self._current_experiment()
                if experiment is not None:
                    arm = assign_arm(query.person_id, experiment.salt, experiment.arms)
        if query.person_id and not personalised:
            name = "popular"
        elif query.model:
            name = query.model
        elif arm is not None and experiment is not None:
            key = arm_model_key(experiment.experiment_id, arm.name)
            name = key if key in snapshot.models else arm.model
        else:
            name = DEFAULT_MODEL
        model = snapshot.models.get(name)
        if model is None and name.startswith("arm:"):
            model = snapshot.models.get(DEFAULT_MODEL)
        if model is None:
            raise FailedPrecondition(
                [("MODEL", f"models/{name}", "is not trained (see GetModelInfo)")],
                f"model {name} is not trained",
            )
        history, purchased, seen = self._history(
            record if personalised else None,
            query.session_item_ids if personalised or not query.person_id else (),
            catalogue,
            now,
        )
        items = snapshot.ranker.recommend(
            model,
            history,
            k=query.k,
            filters=query.filters,
            diversity=query.diversity,
            need=query.need,
            purchased=purchased,
            exclude=seen,
        )
        impression_id = uuid.uuid4().hex
        self.impressions.record(
            {
                "impression_id": impression_id,
                "person_id": query.person_id if personalised else "",
                "experiment_id": experiment.experiment_id if arm and experiment else "",
                "arm": arm.name if arm else "",
                "model": model.name,
                "model_version": model.report.version,
                "item_ids": [item.item_id for item in items],
                "shown_at": now,
            }
        )
        return Answer(
            items,
            personalised,
            arm.name if arm else "",
            impression_id,
            model.name,
            model.report.version,
        )

    def _history(
        self,
        record: PersonRecord | None,
        session: Sequence[str],
        catalogue: Catalogue,
        now: datetime,
    ) -> tuple[History, IntArray, IntArray]:
        """The history to score (stored interactions and the session's items as views now),
        the items bought and the items seen otherwise (both left out of the answer).

        Plain Python over the person's few dozen events: numpy's cost per call would dominate.
        """
        at = now.timestamp()
        items: list[int] = []
        weights: list[float] = []
        times: list[float] = []
        kinds: list[str] = []
        purchased: list[int] = []
        seen: list[int] = []
        if record is not None and len(record):
            for item, weight, moment, kind in zip(
                catalogue.positions(record.item_ids),
                record.weights.tolist(),
                record.times.tolist(),
                record.kinds,
                strict=True,
            ):
                if item < 0:
                    continue
                (purchased if kind == EventType.PURCHASE else seen).append(item)
                if weight > 0:
                    items.append(item)
                    weights.append(weight)
                    times.append(moment)
                    kinds.append(kind)
        if session:
            viewed = [item for item in catalogue.positions(session) if item >= 0]
            seen.extend(viewed)
            view = self.settings.interactions.weight(EventType.VIEW)
            if view > 0:
                items.extend(viewed)
                weights.extend([view] * len(viewed))
                times.extend([at] * len(viewed))
                kinds.extend([str(EventType.VIEW)] * len(viewed))
        history = history_of(
            items,
            weights,
            times,
            kinds,
            now=at,
            half_life_days=self.settings.interactions.half_life_days,
        )
        return (
            history,
            np.array(purchased, dtype=np.int64) if purchased else _NO_ITEMS,
            np.array(seen, dtype=np.int64) if seen else _NO_ITEMS,
        )

    def _grant_holds(self, allowed: bool | None, expires_at: datetime | None) -> bool:
        if not allowed:
            return False
        return expires_at is None or utc(expires_at) > self.clock()

    def _current_experiment(self) -> ExperimentSpec | None:
        """The active experiment, re-read at most every `experiment_cache_seconds` (PutExperiment
        in this process takes effect at once)."""
        cached = self._experiment
        if (
            cached is not None
            and time.monotonic() - cached[0] < self.settings.experiment_cache_seconds
        ):
            return cached[1]
        with self.engine.connect() as connection:
            experiment = self._active_experiment(connection)
        self._experiment = (time.monotonic(), experiment)
        return experiment

    def record_feedback(
        self, impression_id: str, item_id: str, kind: str, occurred_at: datetime | None
    ) -> str:
        """Record feedback on one item of an answer; returns the arm credited."""
        self.impressions.flush()
        with self.engine.begin() as connection:
            row = connection.execute(
                select(impressions_table).where(impressions_table.c.impression_id == impression_id)
            ).first()
            if row is None:
                raise NotFound("impression", impression_id)
            if item_id not in (row.item_ids or []):
                raise InvalidArgument({"item_id": "was not part of this answer"})
            connection.execute(
                insert(feedback_table).values(
                    feedback_id=uuid.uuid4().hex,
                    impression_id=impression_id,
                    item_id=item_id,
                    type=kind,
                    experiment_id=row.experiment_id,
                    arm=row.arm,
                    occurred_at=occurred_at or self.clock(),
                )
            )
        return str(row.arm)

    # Experiments ---------------------------------------------------------------------------------

    def put_experiment(self, experiment: ExperimentSpec) -> ExperimentSpec:
        """Store an experiment; an active one deactivates every other (one serves at a time)."""
        for arm in experiment.arms:
            try:
                self._model(arm.model, arm.parameters)
            except ValueError as error:
                raise InvalidArgument({f"arms[{arm.name}].parameters": str(error)}) from error
        now = self.clock()
        values = {
            "experiment_id": experiment.experiment_id,
            "salt": experiment.salt,
            "arms": [
                {
                    "name": arm.name,
                    "model": arm.model,
                    "parameters": dict(arm.parameters),
                    "traffic_share": arm.traffic_share,
                }
                for arm in experiment.arms
            ],
            "active": experiment.active,
            "updated_at": now,
        }
        with self.engine.begin() as connection:
            if experiment.active:
                connection.execute(update(experiments_table).values(active=False))
            statement = _dialect(connection).insert(experiments_table).values(**values)  # type: ignore[attr-defined]
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[experiments_table.c.experiment_id],
                    set_={k: v for k, v in values.items() if k != "experiment_id"},
                )
            )
        self._experiment = None
        parameterised = any(arm.parameters for arm in experiment.arms)
        if experiment.active and parameterised and self._snapshot is not None:
            self.train_in_background([])
        return experiment

    def _active_experiment(self, connection: Connection) -> ExperimentSpec | None:
        row = connection.execute(
            select(experiments_table).where(experiments_table.c.active.is_(True)).limit(1)
        ).first()
        if row is None:
            return None
        return ExperimentSpec(
            row.experiment_id,
            row.salt,
            tuple(
                ArmSpec(
                    arm["name"],
                    arm["model"],
                    dict(arm.get("parameters") or {}),
                    float(arm["traffic_share"]),
                )
                for arm in row.arms
            ),
            bool(row.active),
        )

    # Data-subject access -------------------------------------------------------------------------

    def export_person(self, person_id: str) -> PersonExport:
        self.impressions.flush()
        with self.engine.connect() as connection:
            interactions = [
                (row.item_id, row.event_type, float(row.weight), utc(row.occurred_at))
                for row in connection.execute(
                    select(interactions_table)
                    .where(interactions_table.c.person_id == person_id)
                    .order_by(interactions_table.c.occurred_at, interactions_table.c.event_id)
                )
            ]
            shown = [
                (row.impression_id, list(row.item_ids), utc(row.shown_at), row.model)
                for row in connection.execute(
                    select(impressions_table)
                    .where(impressions_table.c.person_id == person_id)
                    .order_by(impressions_table.c.shown_at.desc())
                    .limit(self.settings.recent_impressions)
                )
            ]
        return PersonExport(interactions, shown)


def _dialect(connection: Connection) -> Any:
    return postgresql if connection.dialect.name == "postgresql" else sqlite


__all__ = ["Answer", "ModelInfo", "Query", "RecommendService", "RecommendSettings"]
