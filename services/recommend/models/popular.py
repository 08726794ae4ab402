"""Time-decayed popularity, overall and per category: the non-personalised answer.

It is the cold-start fallback of every other model: it needs no history, and the decay built
into the interaction matrix makes this week's favourites outrank last year's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from services.recommend.models.base import (
    Catalogue,
    FloatArray,
    History,
    IntArray,
    InteractionMatrix,
    Scores,
    TrainingReport,
    arrays_size,
    model_version,
    normalised,
    top_k,
)


@dataclass(frozen=True)
class PopularConfig:
    """`damping="log"` counts each person's weight on an item as log(1 + w), so one wholesale
    buyer cannot outweigh many ordinary ones; `"none"` sums weights as they are."""

    damping: Literal["log", "none"] = "log"

    def __post_init__(self) -> None:
        if self.damping not in ("log", "none"):
            raise ValueError("damping must be log or none")


@dataclass(frozen=True)
class PopularModel:
    config: PopularConfig = PopularConfig()
    name: str = "popular"

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedPopular:
        started = time.perf_counter()
        values = data.matrix.data
        if self.config.damping == "log":
            values = np.log1p(values)
        weighted = data.matrix.copy()
        weighted.data = np.asarray(values, dtype=np.float64)
        popularity = normalised(np.asarray(weighted.sum(axis=0), dtype=np.float64).ravel())
        arrays: dict[str, npt.NDArray[Any]] = {"popularity": popularity}
        report = TrainingReport(
            name=self.name,
            version=model_version(self.name, data, catalogue, self.config),
            items=int(np.count_nonzero(popularity)),
            persons=data.n_persons,
            interactions=data.interactions,
            training_seconds=time.perf_counter() - started,
            size_bytes=arrays_size(arrays),
        )
        return TrainedPopular(popularity, catalogue.category_codes, report, self.name)


@dataclass(frozen=True, eq=False)
class TrainedPopular:
    popularity: FloatArray  # in [0, 1], the most popular item at 1
    category_codes: IntArray
    report: TrainingReport
    name: str = "popular"

    def score(self, history: History) -> FloatArray:
        return self.popularity.copy()

    def scored(self, history: History) -> Scores:
        return self._scores

    @cached_property
    def _scores(self) -> Scores:
        """The same for every history, so made once (its maximum is a pass over every item)."""
        return Scores(self.popularity)

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        return {}

    def similar(self, item: int, k: int) -> IntArray:
        """The most popular other items of the same category."""
        same = np.flatnonzero(self.category_codes == self.category_codes[item])
        return top_k(self.popularity, k, same[same != item].astype(np.int64))

    def top_in_category(self, category_code: int, k: int) -> IntArray:
        """The k most popular items of one category."""
        members = np.flatnonzero(self.category_codes == category_code).astype(np.int64)
        return top_k(self.popularity, k, members)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"popularity": self.popularity}
