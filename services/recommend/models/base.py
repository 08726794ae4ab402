"""The one interface every recommender implements, and the data it trains on and scores.

Everything here is deterministic and a pure function of its inputs: items are indexed in id order,
persons in id order, and ties are broken by index. That is what makes exact unlearning hold: a
model trained on data and then retrained without a person is bit-for-bit the model trained
without them from the start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from scipy import sparse

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Sources a score can come from, for explanations (see `TrainedModel.contributions`).
FROM_INTERACTIONS = "interactions"
FROM_CONTENT = "content"


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    """One item as the recommender sees it."""

    item_id: str
    title: str = ""
    category: str = ""
    tags: tuple[str, ...] = ()
    price: float = 0.0
    available: bool = True


class Catalogue:
    """Items in id order, so an item's index is a pure function of the set of items."""

    def __init__(self, items: Iterable[CatalogueItem]) -> None:
        ordered = sorted(items, key=lambda item: item.item_id)
        ids = [item.item_id for item in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError("catalogue item ids must be unique")
        self.items: tuple[CatalogueItem, ...] = tuple(ordered)
        self.item_ids: tuple[str, ...] = tuple(ids)
        self._index = {item_id: position for position, item_id in enumerate(ids)}
        self.categories: tuple[str, ...] = tuple(sorted({item.category for item in ordered}))
        self._category_index = {category: code for code, category in enumerate(self.categories)}
        self.category_codes: IntArray = np.array(
            [self._category_index[item.category] for item in ordered], dtype=np.int64
        )
        self.prices: FloatArray = np.array([item.price for item in ordered], dtype=np.float64)
        self.available: npt.NDArray[np.bool_] = np.array(
            [item.available for item in ordered], dtype=np.bool_
        )

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def index(self, item_id: str) -> int:
        """The item's index; KeyError when it is not in the catalogue."""
        return self._index[item_id]

    def indices(self, item_ids: Iterable[str]) -> IntArray:
        """Indices of the known ids among `item_ids` (unknown ids are skipped), in given order."""
        known = [self._index[item_id] for item_id in item_ids if item_id in self._index]
        return np.array(known, dtype=np.int64)

    def positions(self, item_ids: Iterable[str]) -> list[int]:
        """The index of each id, -1 for ids outside the catalogue (same length as given).

        A list: its caller walks a person's few dozen events in plain Python."""
        index = self._index
        return [index.get(item_id, -1) for item_id in item_ids]

    def category_code(self, category: str) -> int | None:
        """The code of a category, or None when no item has it."""
        return self._category_index.get(category)

    def fingerprint(self) -> str:
        """A digest of everything the models read from the catalogue."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(
                json.dumps(
                    [item.item_id, item.title, item.category, list(item.tags), item.price]
                ).encode()
            )
        return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class History:
    """A person's (or session's) weighted interactions, read at request time.

    `indices` are unique item indices in ascending order, `weights` their decayed weights (> 0),
    `verbs` how each was interacted with ("viewed", "bought", "added to cart") for explanations.
    """

    indices: IntArray
    weights: FloatArray
    verbs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape:
            raise ValueError("history indices and weights differ in length")
        if self.verbs and len(self.verbs) != len(self.indices):
            raise ValueError("history verbs and indices differ in length")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @staticmethod
    def empty() -> History:
        return History(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    @staticmethod
    def of_items(indices: Iterable[int], weight: float = 1.0, verb: str = "viewed") -> History:
        """A history of equally weighted items (a session's items, say)."""
        unique = np.unique(np.fromiter(indices, dtype=np.int64))
        return History(
            unique, np.full(unique.shape, weight, dtype=np.float64), (verb,) * len(unique)
        )

    def verb(self, position: int) -> str:
        return self.verbs[position] if self.verbs else "viewed"


@dataclass(frozen=True, eq=False)
class InteractionMatrix:
    """Decayed interaction weights, persons (in id order) x catalogue items, as CSR.

    Built by `services.recommend.interactions.build_interaction_matrix`.
    """

    persons: tuple[str, ...]
    matrix: Any  # scipy.sparse.csr_matrix, float64, shape (len(persons), len(catalogue))
    interaction_counts: IntArray  # raw interactions folded into each row

    @property
    def n_persons(self) -> int:
        return len(self.persons)

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def interactions(self) -> int:
        return int(self.interaction_counts.sum())

    @cached_property
    def _person_positions(self) -> dict[str, int]:
        return {person: position for position, person in enumerate(self.persons)}

    def person_index(self, person_id: str) -> int | None:
        """The person's row, or None when they have no interactions."""
        return self._person_positions.get(person_id)

    def row(self, position: int) -> History:
        """The history held for the person at `position` (no verbs)."""
        start, end = self.matrix.indptr[position], self.matrix.indptr[position + 1]
        return History(
            np.asarray(self.matrix.indices[start:end], dtype=np.int64),
            np.asarray(self.matrix.data[start:end], dtype=np.float64),
        )

    def history(self, person_id: str) -> History:
        position = self.person_index(person_id)
        return History.empty() if position is None else self.row(position)

    def without_persons(self, person_ids: Iterable[str]) -> InteractionMatrix:
        """The matrix as if these persons had never interacted (rows removed, not zeroed)."""
        forgotten = set(person_ids)
        keep = np.array(
            [position for position, person in enumerate(self.persons) if person not in forgotten],
            dtype=np.int64,
        )
        return InteractionMatrix(
            persons=tuple(self.persons[position] for position in keep),
            matrix=sparse.csr_matrix(self.matrix[keep]),
            interaction_counts=self.interaction_counts[keep],
        )

    def fingerprint(self) -> str:
        return array_fingerprint(
            self.matrix.indptr, self.matrix.indices, self.matrix.data, np.array(self.matrix.shape)
        )


@dataclass(frozen=True)
class TrainingReport:
    """What training produced: the figures `GetModelInfo` reports."""

    name: str
    version: str
    items: int
    persons: int
    interactions: int
    training_seconds: float
    size_bytes: int
    details: Mapping[str, float] = field(default_factory=dict)


class Scores:
    """One component's scores for one history, and how each history entry contributed.

    `values` covers every item when `columns` is None, else only `columns` (the rest score 0).
    A model that serves through a blend (the hybrid) scores each component once per request
    and explains the winners from what scoring already gathered, so `contributions` reuses it.
    """

    __slots__ = ("columns", "top", "values")

    def __init__(self, values: FloatArray, columns: IntArray | None = None) -> None:
        self.values = values
        self.columns = columns
        self.top = float(values.max()) if values.size else 0.0

    def dense(self, n_items: int) -> FloatArray:
        if self.columns is None:
            return self.values
        scores = np.zeros(n_items, dtype=np.float64)
        scores[self.columns] = self.values
        return scores

    def scaled(self, n_items: int, factor: float) -> FloatArray:
        """0 + factor · scores, dense: a blend's first term, written rather than added to zeros
        (+ 0.0 turns -0.0 into 0.0, as the addition would)."""
        values = self.values * factor
        values += 0.0
        if self.columns is None:
            return values
        total = np.zeros(n_items, dtype=np.float64)
        total[self.columns] = values
        return total

    def add_to(self, total: FloatArray, factor: float) -> None:
        """total += factor · scores."""
        if self.columns is None:
            total += self.values * factor
        else:
            total[self.columns] += self.values * factor

    def contributions(self, items: IntArray) -> dict[str, FloatArray]:
        """As `TrainedModel.contributions` for the scored history."""
        return {}


@runtime_checkable
class TrainedModel(Protocol):
    """A trained model: scores a history given at request time, so no retraining per event."""

    @property
    def name(self) -> str: ...

    @property
    def report(self) -> TrainingReport: ...

    def score(self, history: History) -> FloatArray:
        """Scores of every catalogue item (higher is better) for this history."""
        ...

    def contributions(self, history: History, items: IntArray) -> dict[str, FloatArray]:
        """How much each history entry added to each item's score, by source.

        Each value has shape (len(items), len(history)); sources are `FROM_INTERACTIONS` and
        `FROM_CONTENT`. Non-personalised models return no sources.
        """
        ...

    def similar(self, item: int, k: int) -> IntArray:
        """Up to k items most similar to `item`, best first (never `item` itself)."""
        ...

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The learned parameters, for size accounting and exact comparisons."""
        ...


class Model(Protocol):
    """A recommender algorithm with its configuration; training is a pure function."""

    @property
    def name(self) -> str: ...

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> TrainedModel: ...


def array_fingerprint(*arrays: npt.NDArray[Any], config: object = None) -> str:
    """A SHA-256 over arrays (dtype, shape and bytes) and a configuration."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    if config is not None:
        plain = asdict(config) if is_dataclass(config) and not isinstance(config, type) else config
        digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def model_version(name: str, data: InteractionMatrix, catalogue: Catalogue, config: object) -> str:
    """A version that is a pure function of what the model was trained on and how."""
    combined = array_fingerprint(config=[data.fingerprint(), catalogue.fingerprint(), config])
    return f"{name}-{combined[:12]}"


def arrays_size(arrays: Mapping[str, npt.NDArray[Any]]) -> int:
    return int(sum(array.nbytes for array in arrays.values()))


def sparse_arrays(prefix: str, matrix: Any) -> dict[str, npt.NDArray[Any]]:
    """A CSR/CSC matrix as named arrays (for `TrainedModel.arrays`)."""
    return {
        f"{prefix}.data": np.asarray(matrix.data),
        f"{prefix}.indices": np.asarray(matrix.indices),
        f"{prefix}.indptr": np.asarray(matrix.indptr),
    }


def normalised(scores: FloatArray) -> FloatArray:
    """Scores divided by their maximum when it is positive, so blends compare like with like."""
    if scores.size == 0:
        return scores
    top = float(scores.max())
    return scores / top if top > 0 else scores


def top_k(scores: FloatArray, k: int, candidates: IntArray | None = None) -> IntArray:
    """Indices of the k best scores, best first; ties go to the lower index.

    With `candidates`, only those indices compete. `-inf` scores never make the list.
    """
    if candidates is None:
        return _top_k_of_all(scores, k)
    pool = candidates
    values = scores[pool]
    competing = values > -np.inf
    pool, values = pool[competing], values[competing]
    if k <= 0 or pool.size == 0:
        return np.zeros(0, dtype=np.int64)
    if k < pool.size:
        threshold = np.partition(values, pool.size - k)[pool.size - k]
        above = np.flatnonzero(values > threshold)
        ties = np.flatnonzero(values == threshold)
        ties = ties[np.argsort(pool[ties], kind="stable")][: k - above.size]
        chosen = np.concatenate([above, ties])
        pool, values = pool[chosen], values[chosen]
    order = np.lexsort((pool, -values))
    return np.asarray(pool[order], dtype=np.int64)


_SAMPLE_STRIDE = 32


def _top_k_of_all(scores: FloatArray, k: int) -> IntArray:
    """`top_k` over every index (the request path): no copies of the scores.

    The k-th best score of a strided sample is a floor for the k-th best of all, so only the
    scores at or above it compete (usually a few dozen): one comparison instead of a partition
    of every score. Ties at the floor all compete, so the answer is the same.
    """
    size = scores.shape[0]
    if k > 0 and size >= 4 * _SAMPLE_STRIDE * k:
        sample = scores[::_SAMPLE_STRIDE]
        sample = sample[sample > -np.inf]
        if sample.size >= k:
            floor = np.partition(sample, sample.size - k)[sample.size - k]
            candidates = np.flatnonzero(scores >= floor)
            if candidates.size < size // 4:
                # Every candidate is finite and at least the floor: the k-th best of them is a
                # threshold, and sorting those at or above it (ties included) settles the order.
                values = scores[candidates]
                threshold = np.partition(values, values.size - k)[values.size - k]
                chosen = candidates[values >= threshold]
                order = np.lexsort((chosen, -scores[chosen]))[:k]
                return np.asarray(chosen[order], dtype=np.int64)
    competing = scores > -np.inf
    count = int(np.count_nonzero(competing))
    if k <= 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= count:
        chosen = np.flatnonzero(competing)
    else:
        size = scores.shape[0]
        threshold = np.partition(scores, size - k)[size - k]
        above = np.flatnonzero(scores > threshold)
        ties = np.flatnonzero(scores == threshold)[: k - above.size]
        chosen = np.concatenate([above, ties])
    order = np.lexsort((chosen, -scores[chosen]))
    return np.asarray(chosen[order], dtype=np.int64)


def rows_top_m(matrix: Any, m: int) -> Any:
    """Keep the m largest entries of every CSR row (ties to the lower column), drop the rest."""
    matrix = sparse.csr_matrix(matrix, copy=True)
    matrix.eliminate_zeros()
    counts = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), counts)
    order = np.lexsort((matrix.indices, -matrix.data, rows))
    rank = np.arange(order.size, dtype=np.int64) - np.repeat(matrix.indptr[:-1], counts)
    keep = order[rank < m]
    kept_rows = rows[keep]
    result = sparse.csr_matrix(
        (matrix.data[keep], (kept_rows, matrix.indices[keep])), shape=matrix.shape
    )
    result.sort_indices()
    return result


def check_history(history: History, n_items: int) -> None:
    if len(history) and (history.indices.min() < 0 or history.indices.max() >= n_items):
        raise IndexError("history holds an item index outside the catalogue")


def csr_entries(matrix: Any, rows: IntArray) -> tuple[IntArray, IntArray, FloatArray]:
    """The stored entries of some CSR rows as (position in `rows`, column, value) arrays.

    Plain numpy on the CSR arrays: scipy's fancy row indexing builds and validates a new matrix,
    which costs more than the arithmetic on the few rows a request reads.
    """
    indptr = matrix.indptr
    starts = np.asarray(indptr[rows], dtype=np.int64)
    lengths = np.asarray(indptr[rows + 1], dtype=np.int64) - starts
    total = int(lengths.sum())
    positions = np.repeat(np.arange(rows.shape[0], dtype=np.int64), lengths)
    offsets = np.arange(total, dtype=np.int64) + np.repeat(
        starts - (np.cumsum(lengths) - lengths), lengths
    )
    return (
        positions,
        np.asarray(matrix.indices[offsets], dtype=np.int64),
        np.asarray(matrix.data[offsets], dtype=np.float64),
    )


def weighted_rows(matrix: Any, history: History) -> FloatArray:
    """Σ_j w_j · matrix[j] over the history, as a dense vector (CSR or dense matrix)."""
    if len(history) == 0:
        return np.zeros(matrix.shape[1], dtype=np.float64)
    if isinstance(matrix, np.ndarray):
        return np.asarray(history.weights @ matrix[history.indices], dtype=np.float64)
    positions, columns, values = csr_entries(matrix, history.indices)
    return np.bincount(
        columns, weights=values * history.weights[positions], minlength=matrix.shape[1]
    ).astype(np.float64, copy=False)


def dense_rows(matrix: Any, rows: IntArray) -> FloatArray:
    """matrix[rows] as a dense float64 array (CSR)."""
    dense = np.zeros((rows.shape[0], matrix.shape[1]), dtype=np.float64)
    positions, columns, values = csr_entries(matrix, rows)
    dense[positions, columns] = values
    return dense


def dense_block(matrix: Any, rows: IntArray, columns: IntArray) -> FloatArray:
    """matrix[rows][:, columns] as a dense float64 array (CSR or dense)."""
    if isinstance(matrix, np.ndarray):
        return np.asarray(matrix[np.ix_(rows, columns)], dtype=np.float64)
    if np.unique(columns).size != columns.size:
        return np.asarray(matrix[rows][:, columns].toarray(), dtype=np.float64)
    block = np.zeros((rows.shape[0], columns.shape[0]), dtype=np.float64)
    positions, stored, values = csr_entries(matrix, rows)
    place = np.full(matrix.shape[1], -1, dtype=np.int64)
    place[columns] = np.arange(columns.shape[0], dtype=np.int64)
    wanted = place[stored] >= 0
    block[positions[wanted], place[stored[wanted]]] = values[wanted]
    return block


def parse_parameters(config_type: type[Any], parameters: Mapping[str, str]) -> Any:
    """A config dataclass from string parameters (an experiment arm's `parameters` map).

    Unknown names raise ValueError, so a typo in an experiment is refused, not ignored.
    """
    fields = config_type.__dataclass_fields__
    values: dict[str, object] = {}
    for key, raw in parameters.items():
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} for {config_type.__name__}")
        default = getattr(config_type(), key)
        values[key] = _parse_like(default, raw, key)
    return config_type(**values)


def _parse_like(default: object, raw: str, key: str) -> object:
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(text)
            return text.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            return None if text.lower() in {"", "none"} else float(text)
        if isinstance(default, str):
            return text
    except ValueError as error:
        raise ValueError(f"parameter {key!r}: cannot read {raw!r}") from error
    raise ValueError(f"parameter {key!r} cannot be set from an experiment")
