"""Content similarity from category and tags: works for items nobody has touched yet.

Each item is a unit vector: its category (one feature) and its tags (TF-IDF over the catalogue,
so a tag every item has says little), weighted by `category_weight` and `tag_weight`. Similarity
is the cosine. Scoring a history is F·(Fᵀ·h) minus each history item's similarity to itself, so
it costs O(nnz) and never needs the item x item matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse

from services.recommend.models.base import (
    FROM_CONTENT,
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
    dense_rows,
    model_version,
    sparse_arrays,
    top_k,
)

_DENSE_LIMIT = 1 << 20
"""Largest number of cells explanations densify (items x features) at once."""


@dataclass(frozen=True)
class ContentConfig:
    category_weight: float = 1.0
    tag_weight: float = 1.0


def normalise_tag(tag: str) -> str:
    return tag.strip().casefold()


def content_features(catalogue: Catalogue, config: ContentConfig = ContentConfig()) -> Any:
    """Items x (categories + tags), rows of unit length (or zero without category and tags)."""
    n_items = len(catalogue)
    has_category = np.array([bool(item.category) for item in catalogue.items], dtype=np.bool_)
    category_rows = np.flatnonzero(has_category)
    categories = sparse.csr_matrix(
        (
            np.full(category_rows.size, config.category_weight, dtype=np.float64),
            (category_rows, catalogue.category_codes[category_rows]),
        ),
        shape=(n_items, max(len(catalogue.categories), 1)),
    )
    item_tags = [
        sorted({normalise_tag(tag) for tag in item.tags} - {""}) for item in catalogue.items
    ]
    vocabulary = {
        tag: column for column, tag in enumerate(sorted({t for ts in item_tags for t in ts}))
    }
    rows = np.repeat(np.arange(n_items), [len(tags) for tags in item_tags])
    columns = np.array([vocabulary[tag] for tags in item_tags for tag in tags], dtype=np.int64)
    tags = sparse.csr_matrix(
        (np.ones(columns.size), (rows, columns)), shape=(n_items, max(len(vocabulary), 1))
    )
    if tags.nnz:
        document_frequency = np.bincount(tags.indices, minlength=tags.shape[1])
        idf = np.log(n_items / np.maximum(document_frequency, 1)) + 1.0
        tags.data = tags.data * idf[tags.indices]
        tags = _unit_rows(tags) * config.tag_weight
    features = sparse.hstack([categories, tags], format="csr")
    return _unit_rows(features)


def _unit_rows(matrix: Any) -> Any:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1), dtype=np.float64).ravel())
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    result = sparse.csr_matrix(sparse.diags(inverse) @ matrix)
    result.eliminate_zeros()
    result.sort_indices()
    return result


@dataclass(frozen=True)
class ContentModel:
    config: ContentConfig = ContentConfig()
    name: str = "content"

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedContent:
        started = time.perf_counter()
        features = content_features(catalogue, self.config)
        arrays = sparse_arrays("features", features)
        report = TrainingReport(
            name=self.name,
            version=model_version(self.name, data, catalogue, self.config),
            items=int(np.count_nonzero(np.diff(features.indptr))),
            persons=data.n_persons,
            interactions=data.interactions,
            training_seconds=time.perf_counter() - started,
            size_bytes=arrays_size(arrays),
        )
        return TrainedContent(features, sparse.csr_matrix(features.T), report, self.name)


@dataclass(frozen=True, eq=False)
class TrainedContent:
    features: Any  # CSR items x features, unit rows
    features_t: Any  # CSR features x items
    report: TrainingReport
    name: str = "content"

    def scored(self, history: History) -> _ContentScores:
        n_items = self.features.shape[0]
        check_history(history, n_items)
        if len(history) == 0:
            return _ContentScores(self, history, np.zeros(n_items, dtype=np.float64))
        positions, columns, values = csr_entries(self.features, history.indices)
        weighted = values * history.weights[positions]
        profile = np.bincount(columns, weights=weighted, minlength=self.features.shape[1])
        scores = np.asarray(self.features @ profile, dtype=np.float64).ravel()
        own = np.bincount(positions, weights=weighted * values, minlength=len(history))
        scores[history.indices] -= own
        return _ContentScores(self, history, scores, positions, columns, values)

    def score(self, history: History) -> FloatArray:
        return self.scored(history).values

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        return self.scored(history).contributions(items)

    def similarity(self, items: IntArray) -> FloatArray:
        """Pairwise cosine similarity of `items` (for diversity)."""
        rows = self.features[items]
        return np.asarray((rows @ rows.T).toarray(), dtype=np.float64)

    def similar(self, item: int, k: int) -> IntArray:
        values = np.asarray(self.features @ self.features_t[:, item].toarray(), dtype=np.float64)
        values = values.ravel()
        values[item] = -np.inf
        values[values <= 0] = -np.inf
        return top_k(values, k)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return sparse_arrays("features", self.features)


class _ContentScores(Scores):
    """Content scores, keeping the history's feature entries."""

    __slots__ = ("_entries", "_indices", "_model", "_weights")

    def __init__(
        self,
        model: TrainedContent,
        history: History,
        scores: FloatArray,
        *entries: Any,
    ) -> None:
        super().__init__(scores)
        # Not the history itself: the hybrid keeps these scores in a dictionary weakly keyed
        # by the history, which a reference back would keep alive for ever.
        self._model, self._indices, self._weights = model, history.indices, history.weights
        self._entries = entries

    def contributions(self, items: IntArray) -> dict[str, FloatArray]:
        indices, features = self._indices, self._model.features
        block = np.zeros((len(items), indices.size), dtype=np.float64)
        if not indices.size:
            return {FROM_CONTENT: block}
        if len(items) * features.shape[1] <= _DENSE_LIMIT:
            # Sums of products over the history's stored features: no BLAS call on the request
            # path (OpenBLAS's threads cost more than these few products when threads share it).
            positions, columns, values = self._entries
            if columns.size:
                products = dense_rows(features, items)[:, columns] * values
                first = np.empty(positions.size, dtype=np.bool_)
                first[0] = True
                np.not_equal(positions[1:], positions[:-1], out=first[1:])
                starts = np.flatnonzero(first)
                block[:, positions[starts]] = np.add.reduceat(products, starts, axis=1)
        else:
            product = features[items] @ self._model.features_t[:, indices]
            block = np.asarray(product.toarray(), dtype=np.float64)
        block[items[:, None] == indices[None, :]] = 0.0
        return {FROM_CONTENT: block * self._weights[None, :]}
