"""The default model: a blend of the others with a fallback chain.

- no history: popularity alone (the cold start);
- a thin history (fewer than `thin_history` items): collaborative scores blended with a larger
  share of content similarity and popularity, since a few interactions say little;
- otherwise: mostly collaborative (EASE and item kNN), with a little content and popularity to
  reach new items and to break ties.

Each component's scores are divided by their maximum before blending, so the shares mean what
they say whatever scale a component works on.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import numpy.typing as npt

from services.recommend.models.base import (
    Catalogue,
    FloatArray,
    History,
    IntArray,
    InteractionMatrix,
    Scores,
    TrainedModel,
    TrainingReport,
    array_fingerprint,
)
from services.recommend.models.content import ContentConfig, ContentModel
from services.recommend.models.ease import EASEConfig, EASEModel
from services.recommend.models.item_knn import ItemKNNConfig, ItemKNNModel
from services.recommend.models.popular import PopularConfig, PopularModel

COMPONENTS = ("ease", "item_knn", "content", "popular")


@dataclass(frozen=True)
class Blend:
    """Shares of each component (they need not sum to 1)."""

    ease: float = 0.0
    item_knn: float = 0.0
    content: float = 0.0
    popular: float = 0.0

    def share(self, component: str) -> float:
        return float(getattr(self, component))


@dataclass(frozen=True)
class HybridConfig:
    thin_history: int = 3
    full: Blend = Blend(ease=0.6, item_knn=0.3, content=0.1)
    thin: Blend = Blend(ease=0.35, item_knn=0.25, content=0.25, popular=0.15)
    popular: PopularConfig = field(default_factory=PopularConfig)
    item_knn: ItemKNNConfig = field(default_factory=ItemKNNConfig)
    ease: EASEConfig = field(default_factory=EASEConfig)
    content: ContentConfig = field(default_factory=ContentConfig)


@dataclass(frozen=True)
class HybridModel:
    config: HybridConfig = HybridConfig()
    name: str = "hybrid"

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedHybrid:
        started = time.perf_counter()
        components: dict[str, TrainedModel] = {
            "ease": EASEModel(self.config.ease).train(data, catalogue),
            "item_knn": ItemKNNModel(self.config.item_knn).train(data, catalogue),
            "content": ContentModel(self.config.content).train(data, catalogue),
            "popular": PopularModel(self.config.popular).train(data, catalogue),
        }
        versions = [components[name].report.version for name in COMPONENTS]
        version = array_fingerprint(config=[versions, self.config])[:12]
        report = TrainingReport(
            name=self.name,
            version=f"{self.name}-{version}",
            items=len(catalogue),
            persons=data.n_persons,
            interactions=data.interactions,
            training_seconds=time.perf_counter() - started,
            size_bytes=sum(component.report.size_bytes for component in components.values()),
            details={
                f"{name}_seconds": component.report.training_seconds
                for name, component in components.items()
            },
        )
        return TrainedHybrid(components, self.config, report, self.name)


@dataclass(frozen=True, eq=False)
class TrainedHybrid:
    components: dict[str, TrainedModel]
    config: HybridConfig
    report: TrainingReport
    name: str = "hybrid"
    _parts: WeakKeyDictionary[History, list[tuple[float, Scores]]] = field(
        default_factory=WeakKeyDictionary, repr=False
    )
    """The scaled components of the histories being answered: a request scores its history and
    then explains the winners from the same parts, so each component scores it only once."""

    def route(self, history: History) -> str:
        """Which step of the fallback chain serves this history: popular, thin or full."""
        if len(history) == 0:
            return "popular"
        return "thin" if len(history) < self.config.thin_history else "full"

    def blend(self, history: History) -> Blend:
        route = self.route(history)
        if route == "popular":
            return Blend(popular=1.0)
        return self.config.thin if route == "thin" else self.config.full

    def _scaled(self, history: History) -> list[tuple[float, Scores]]:
        """(share / max score, scores) of every component with a share and a positive score."""
        remembered = self._parts.get(history)
        if remembered is not None:
            return remembered
        blend = self.blend(history)
        parts = []
        for name in COMPONENTS:
            share = blend.share(name)
            if share <= 0:
                continue
            component = self.components[name]
            scored = getattr(component, "scored", None)
            scores = scored(history) if scored is not None else _Plain(component, history)
            if scores.top > 0:
                parts.append((share / scores.top, scores))
        self._parts[history] = parts
        return parts

    def score(self, history: History) -> FloatArray:
        parts = self._scaled(history)
        if not parts:
            return np.zeros(self.report.items, dtype=np.float64)
        total = parts[0][1].scaled(self.report.items, parts[0][0])
        for factor, scores in parts[1:]:
            scores.add_to(total, factor)
        return total

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        result: dict[str, FloatArray] = {}
        for factor, scores in self._scaled(history):
            for source, values in scores.contributions(items).items():
                values *= factor
                if source in result:
                    result[source] += values
                else:
                    result[source] = values
        return result

    def similar(self, item: int, k: int) -> IntArray:
        """Collaborative neighbours first, then content neighbours, then popular in category."""
        chosen: list[int] = []
        for name in ("item_knn", "content", "popular"):
            for candidate in self.components[name].similar(item, k):
                if int(candidate) not in chosen:
                    chosen.append(int(candidate))
            if len(chosen) >= k:
                break
        return np.array(chosen[:k], dtype=np.int64)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {
            f"{name}.{key}": array
            for name in COMPONENTS
            for key, array in self.components[name].arrays().items()
        }


class _Plain(Scores):
    """A component without `scored`: its dense scores, explained by `contributions`."""

    __slots__ = ("_component", "_history")

    def __init__(self, component: TrainedModel, history: History) -> None:
        super().__init__(component.score(history))
        # Weakly: these scores are kept in a dictionary weakly keyed by the history.
        self._component, self._history = component, weakref.ref(history)

    def contributions(self, items: IntArray) -> dict[str, FloatArray]:
        history = self._history()
        if history is None:  # pragma: no cover - the caller holds the history it explains
            raise ReferenceError("the history explained is gone")
        return self._component.contributions(history, items)
