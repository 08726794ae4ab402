"""Item-to-item kNN: cosine similarity of items over who interacted with them.

Items are documents and persons are terms: BM25 (or TF-IDF) weighting damps persons who touch
everything (their co-occurrences say little) and normalises for item popularity, before the
cosine. Only the top M neighbours of each item are kept (CSR), so scoring a history of h items
costs O(h·M).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

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
    csr_entries,
    model_version,
    rows_top_m,
    sparse_arrays,
)

_BLOCK_ITEMS = 2048


@dataclass(frozen=True)
class ItemKNNConfig:
    """`neighbours` is M; `k1` and `b` are BM25's saturation and length normalisation."""

    neighbours: int = 100
    weighting: Literal["bm25", "tfidf", "none"] = "bm25"
    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError("neighbours must be at least 1")
        if self.weighting not in ("bm25", "tfidf", "none"):
            raise ValueError("weighting must be bm25, tfidf or none")


def weigh_item_person(item_person: Any, config: ItemKNNConfig) -> Any:
    """The items x persons matrix weighted as documents x terms (CSR, float64)."""
    weighted = sparse.csr_matrix(item_person, dtype=np.float64, copy=True)
    n_items = weighted.shape[0]
    if config.weighting == "none" or weighted.nnz == 0:
        return weighted
    items_per_person = np.bincount(weighted.indices, minlength=weighted.shape[1])
    item_of_entry = np.repeat(np.arange(n_items), np.diff(weighted.indptr))
    if config.weighting == "tfidf":
        idf = np.log(n_items / np.maximum(items_per_person, 1))
        weighted.data = weighted.data * idf[weighted.indices]
    else:
        idf = np.log(1.0 + (n_items - items_per_person + 0.5) / (items_per_person + 0.5))
        length = np.asarray(weighted.sum(axis=1), dtype=np.float64).ravel()
        average = float(length.mean()) if n_items else 1.0
        norm = config.k1 * (1.0 - config.b + config.b * length / (average or 1.0))
        tf = weighted.data
        weighted.data = tf * (config.k1 + 1.0) / (tf + norm[item_of_entry]) * idf[weighted.indices]
    weighted.eliminate_zeros()
    return weighted


def cosine_top_m(item_features: Any, neighbours: int) -> Any:
    """Cosine similarity between rows, zero diagonal, top `neighbours` per row (CSR)."""
    rows = sparse.csr_matrix(item_features, dtype=np.float64)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1), dtype=np.float64).ravel())
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    unit = sparse.csr_matrix(sparse.diags(inverse) @ rows)
    unit_t = sparse.csr_matrix(unit.T)
    blocks = []
    for start in range(0, unit.shape[0], _BLOCK_ITEMS):
        stop = min(start + _BLOCK_ITEMS, unit.shape[0])
        block = sparse.csr_matrix(unit[start:stop] @ unit_t)
        own_row = np.repeat(np.arange(start, stop), np.diff(block.indptr))
        block.data[block.indices == own_row] = 0.0
        blocks.append(rows_top_m(block, neighbours))
    if not blocks:
        return sparse.csr_matrix((0, 0), dtype=np.float64)
    return sparse.csr_matrix(sparse.vstack(blocks, format="csr"))


@dataclass(frozen=True)
class ItemKNNModel:
    config: ItemKNNConfig = ItemKNNConfig()
    name: str = "item_knn"

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedItemKNN:
        started = time.perf_counter()
        item_person = weigh_item_person(data.matrix.T, self.config)
        similarity = cosine_top_m(item_person, self.config.neighbours)
        arrays = sparse_arrays("similarity", similarity)
        report = TrainingReport(
            name=self.name,
            version=model_version(self.name, data, catalogue, self.config),
            items=int(np.count_nonzero(np.diff(similarity.indptr))),
            persons=data.n_persons,
            interactions=data.interactions,
            training_seconds=time.perf_counter() - started,
            size_bytes=arrays_size(arrays),
            details={"neighbour_pairs": float(similarity.nnz)},
        )
        return TrainedItemKNN(similarity, report, self.name)


@dataclass(frozen=True, eq=False)
class TrainedItemKNN:
    similarity: Any  # CSR items x items: row j holds item j's top-M neighbours
    report: TrainingReport
    name: str = "item_knn"

    def scored(self, history: History) -> _KNNScores:
        check_history(history, self.similarity.shape[0])
        positions, columns, values = csr_entries(self.similarity, history.indices)
        weighted = values * history.weights[positions]
        scores = np.bincount(columns, weights=weighted, minlength=self.similarity.shape[1])
        return _KNNScores(
            np.asarray(scores, dtype=np.float64),
            len(history),
            self.similarity.shape[1],
            positions,
            columns,
            weighted,
        )

    def score(self, history: History) -> FloatArray:
        return self.scored(history).values

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        return self.scored(history).contributions(items)

    def similar(self, item: int, k: int) -> IntArray:
        start, stop = self.similarity.indptr[item], self.similarity.indptr[item + 1]
        columns = np.asarray(self.similarity.indices[start:stop], dtype=np.int64)
        values = np.asarray(self.similarity.data[start:stop], dtype=np.float64)
        order = np.lexsort((columns, -values))
        return columns[order][values[order] > 0][:k]

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return sparse_arrays("similarity", self.similarity)


class _KNNScores(Scores):
    """kNN scores, keeping the neighbour entries of the history's items."""

    __slots__ = ("_columns", "_length", "_n_items", "_positions", "_weighted")

    def __init__(
        self,
        scores: FloatArray,
        length: int,
        n_items: int,
        positions: IntArray,
        columns: IntArray,
        weighted: FloatArray,
    ) -> None:
        super().__init__(scores)
        self._length, self._n_items, self._positions = length, n_items, positions
        self._columns, self._weighted = columns, weighted

    def contributions(self, items: IntArray) -> dict[str, FloatArray]:
        result = np.zeros((len(items), self._length), dtype=np.float64)
        if not items.size or not self._columns.size:
            return {FROM_INTERACTIONS: result}
        # Each item's answer row, looked up for every neighbour entry the history read.
        row_of = np.full(self._n_items, -1, dtype=np.int64)
        row_of[items] = np.arange(items.size, dtype=np.int64)
        if bool((row_of[items] != np.arange(items.size)).any()):
            unique, inverse = np.unique(items, return_inverse=True)
            return {FROM_INTERACTIONS: self.contributions(unique)[FROM_INTERACTIONS][inverse]}
        rows = row_of[self._columns]
        hit = np.flatnonzero(rows >= 0)
        # Each (history item, neighbour) pair is stored once in the CSR rows.
        result[rows[hit], self._positions[hit]] = self._weighted[hit]
        return {FROM_INTERACTIONS: result}
