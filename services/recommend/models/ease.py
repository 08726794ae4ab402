"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"), closed form.

P = (XᵀX + λI)⁻¹ and B = I - P·diagMat(1/diag(P)), i.e. B_ij = -P_ij / P_jj off the diagonal and
0 on it. The item-item matrix B is dense, so EASE covers at most `max_items` items: above that,
the most interacted-with ones (ties to the lower index), as Steck does for large catalogues; the
rest score 0. Scoring a history of h items is one dense combination of h rows of B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse

from services.recommend.models.base import (
    FROM_INTERACTIONS,
    Catalogue,
    FloatArray,
    History,
    IntArray,
    InteractionMatrix,
    Scores,
    TrainingReport,
    arrays_size,
    check_history,
    model_version,
    top_k,
    weighted_rows,
)


@dataclass(frozen=True)
class EASEConfig:
    """`l2` is λ. With `l2_grid`, λ is instead the grid value with the best NDCG@`validation_k`
    on a validation part of the training data (a seeded 20% of each person's items, at most
    `validation_persons` persons), so it is still a pure function of the data. `binary` trains
    on who interacted (Steck's setting) rather than on the decayed weights."""

    l2: float = 100.0
    l2_grid: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
    validation_seed: int = 0
    validation_persons: int = 2_000
    validation_k: int = 10
    max_items: int = 10_000
    binary: bool = True

    def __post_init__(self) -> None:
        if self.l2 <= 0 or any(value <= 0 for value in self.l2_grid):
            raise ValueError("l2 must be positive")
        if self.max_items < 1:
            raise ValueError("max_items must be at least 1")


def ease_weights(gram: FloatArray, l2: float) -> FloatArray:
    """B from the Gram matrix XᵀX: the closed form of Steck (2019), eq. 8."""
    regularised = gram.astype(np.float64, copy=True)
    regularised[np.diag_indices_from(regularised)] += l2
    inverse = np.asarray(np.linalg.inv(regularised), dtype=np.float64)
    return _weights_from_inverse(inverse)


def _weights_from_inverse(inverse: FloatArray) -> FloatArray:
    weights = inverse / -np.diag(inverse)[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def gram_matrix(data: InteractionMatrix, binary: bool) -> FloatArray:
    matrix = sparse.csc_matrix(data.matrix, copy=True)
    if binary:
        matrix.data = np.ones_like(matrix.data)
    return np.asarray((matrix.T @ matrix).toarray(), dtype=np.float64)


@dataclass(frozen=True)
class _ValidationScorer:
    weights: FloatArray
    binary: bool

    def score(self, history: History) -> FloatArray:
        if self.binary:
            history = History(history.indices, np.ones(len(history)))
        return weighted_rows(self.weights, history)


def tune_l2(data: InteractionMatrix, config: EASEConfig) -> tuple[float, float]:
    """(λ, its validation NDCG): the grid value that ranks held-out items best."""
    # Imported here: evaluation imports the models package, which imports this module.
    from services.recommend.evaluation import holdout_matrix, measure, recommend_lists

    reduced, held = holdout_matrix(
        data, 0.2, config.validation_seed, persons=config.validation_persons
    )
    rows = sorted(held)
    if not rows:
        return config.l2, 0.0
    gram = gram_matrix(reduced, config.binary)
    best_l2, best_ndcg = config.l2, -1.0
    for l2 in config.l2_grid:
        scorer = _ValidationScorer(ease_weights(gram, l2), config.binary)
        lists = recommend_lists(scorer, reduced, rows, config.validation_k)
        ndcg = measure(lists, [held[row] for row in rows], config.validation_k, reduced)["ndcg"]
        if ndcg > best_ndcg:
            best_l2, best_ndcg = l2, ndcg
    return best_l2, best_ndcg


def covered_items(data: InteractionMatrix, max_items: int) -> IntArray:
    """All items when they fit, else the `max_items` with the most persons, in index order."""
    if data.n_items <= max_items:
        return np.arange(data.n_items, dtype=np.int64)
    persons_per_item = np.bincount(data.matrix.indices, minlength=data.n_items).astype(np.float64)
    return np.sort(top_k(persons_per_item, max_items))


@dataclass(frozen=True)
class EASEModel:
    config: EASEConfig = EASEConfig()
    name: str = "ease"

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedEASE:
        started = time.perf_counter()
        covered = covered_items(data, self.config.max_items)
        subset = InteractionMatrix(
            data.persons, sparse.csr_matrix(data.matrix[:, covered]), data.interaction_counts
        )
        l2, validation_ndcg = self.config.l2, float("nan")
        if self.config.l2_grid:
            l2, validation_ndcg = tune_l2(subset, self.config)
        # float32 halves memory and scoring bandwidth; rankings do not need more digits.
        weights = ease_weights(gram_matrix(subset, self.config.binary), l2).astype(np.float32)
        position = np.full(data.n_items, -1, dtype=np.int64)
        position[covered] = np.arange(covered.size, dtype=np.int64)
        arrays: dict[str, npt.NDArray[Any]] = {"weights": weights, "covered": covered}
        report = TrainingReport(
            name=self.name,
            version=model_version(self.name, data, catalogue, self.config),
            items=int(covered.size),
            persons=data.n_persons,
            interactions=data.interactions,
            training_seconds=time.perf_counter() - started,
            size_bytes=arrays_size(arrays),
            details={"l2": l2, "validation_ndcg": validation_ndcg},
        )
        return TrainedEASE(weights, covered, position, self.config.binary, report, self.name)


@dataclass(frozen=True, eq=False)
class TrainedEASE:
    weights: npt.NDArray[np.float32]  # B over the covered items
    covered: IntArray  # catalogue index of each row/column of B
    position: IntArray  # catalogue index -> row of B, or -1
    binary: bool
    report: TrainingReport
    name: str = "ease"

    def scored(self, history: History) -> _EASEScores:
        check_history(history, self.position.shape[0])
        rows = self.position[history.indices]
        inside = np.flatnonzero(rows >= 0)
        # A sum of rows rather than a BLAS product (no OpenBLAS threads on the request path),
        # in float32 like B itself: 4x less work than widening every row first.
        block = self.weights[rows[inside]]
        if self.binary:
            weights = np.ones(inside.size, dtype=np.float64)
            summed = block.sum(axis=0)
        else:
            weights = history.weights[inside]
            summed = (block * weights.astype(np.float32)[:, None]).sum(axis=0)
        return _EASEScores(self, len(history), inside, block, weights, summed)

    def score(self, history: History) -> FloatArray:
        return self.scored(history).dense(self.position.shape[0])

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        return self.scored(history).contributions(items)

    def similar(self, item: int, k: int) -> IntArray:
        row = self.position[item]
        if row < 0:
            return np.zeros(0, dtype=np.int64)
        values = self.weights[row].astype(np.float64)
        values[values <= 0] = -np.inf
        return np.asarray(self.covered[top_k(values, k)], dtype=np.int64)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"weights": self.weights, "covered": self.covered}


class _EASEScores(Scores):
    """EASE's scores over the covered items, keeping the rows of B the history picked."""

    __slots__ = ("_block", "_inside", "_length", "_model", "_weights")

    def __init__(
        self,
        model: TrainedEASE,
        length: int,
        inside: IntArray,
        block: npt.NDArray[np.float32],
        weights: FloatArray,
        summed: npt.NDArray[np.float32],
    ) -> None:
        if inside.size:
            super().__init__(summed.astype(np.float64), model.covered)
        else:
            super().__init__(np.zeros(model.position.shape[0], dtype=np.float64))
        self._model, self._length, self._inside = model, length, inside
        self._block, self._weights = block, weights

    def contributions(self, items: IntArray) -> dict[str, FloatArray]:
        result = np.zeros((len(items), self._length), dtype=np.float64)
        columns = self._model.position[items]
        inside_columns = np.flatnonzero(columns >= 0)
        if self._inside.size and inside_columns.size:
            block = self._block[:, columns[inside_columns]].astype(np.float64)
            result[inside_columns[:, None], self._inside] = (block * self._weights[:, None]).T
        return {FROM_INTERACTIONS: result}
