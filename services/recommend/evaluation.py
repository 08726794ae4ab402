"""Offline evaluation: data loaders, splits, ranking metrics and the protocol that runs them.

Protocol: hold out part of each person's items (per person 20% at random with a fixed seed, or
everything after a time cut-off), train every model on the rest, rank *all* catalogue items for
each person from their training history (their training items excluded), and compare the top k
with the held-out items. Metrics are means over the persons evaluated, except coverage and
novelty, which describe the lists as a whole:

- precision@k = hits / k; recall@k = hits / |held out|; F1 = their harmonic mean per person;
- NDCG@k with binary gains, DCG = Σ 1/log2(rank + 1), ideal DCG over min(k, |held out|) hits;
- MAP@k: average precision at each hit, divided by min(k, |held out|);
- hit rate: share of persons with at least one hit;
- coverage: share of catalogue items recommended to anyone;
- novelty: mean self-information -log2 p(i) of recommended items, p(i) = (persons with i + 1) /
  (persons + 1) in training (Zhou et al. 2010, smoothed so unseen items stay finite).

`steward eval` and `bench/recommend_eval.py` both call `run_evaluation`, so there is one
implementation of splits and metrics.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from rich import box
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from scipy import sparse

from services.recommend.interactions import (
    EventType,
    Interaction,
    InteractionSettings,
    build_interaction_matrix,
    timestamp,
)
from services.recommend.matching import stem
from services.recommend.models import MODEL_NAMES, build_model
from services.recommend.models.base import (
    Catalogue,
    CatalogueItem,
    FloatArray,
    History,
    IntArray,
    InteractionMatrix,
    top_k,
)

DataFormat = Literal["movielens", "online-retail", "csv"]
SplitMethod = Literal["random", "temporal"]
METRICS: tuple[str, ...] = (
    "precision",
    "recall",
    "f1",
    "ndcg",
    "map",
    "hit_rate",
    "coverage",
    "novelty",
)

LABELS: Mapping[str, str] = {
    "precision": "P",
    "recall": "R",
    "f1": "F1",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "HR",
    "coverage": "cover",
    "novelty": "novelty",
}

ONLINE_RETAIL_CITATION = (
    "Data: UCI Online Retail (first 20,000 rows, 1-14 Dec 2010). D. Chen, S. L. Sain and K. Guo "
    "(2012), 'Data mining for the online retail industry: a case study of RFM model-based "
    "customer segmentation using data mining', Journal of Database Marketing and Customer "
    "Strategy Management 19(3):197-208; UCI Machine Learning Repository; licence CC BY 4.0."
)
MOVIELENS_CITATION = (
    "Data: MovieLens 100K. F. M. Harper and J. A. Konstan (2015), 'The MovieLens Datasets: "
    "History and Context', ACM Transactions on Interactive Intelligent Systems 5(4):19; "
    "GroupLens Research, University of Minnesota."
)


class DataError(ValueError):
    """A data file that cannot be read in the stated format."""


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: list[Interaction]
    catalogue: Catalogue
    citation: str = ""

    @property
    def persons(self) -> int:
        return len({interaction.person_id for interaction in self.interactions})


# Loaders --------------------------------------------------------------------------------------


def load_movielens(path: Path, *, min_rating: float = 0.0) -> Dataset:
    """MovieLens `u.data` (user, item, rating, timestamp; tab-separated) as implicit feedback.

    Every rating at or above `min_rating` is one interaction of weight 1. When `u.item` sits
    beside the file, titles and genres (category: the first genre; tags: all of them) come too.
    """
    interactions: list[Interaction] = []
    try:
        with path.open(encoding="latin-1") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 4:
                    raise DataError(f"{path}:{number}: expected user, item, rating, timestamp")
                user, item, rating, moment = fields[:4]
                if float(rating) < min_rating:
                    continue
                interactions.append(
                    Interaction(user.strip(), item.strip(), 1.0, float(moment), EventType.PURCHASE)
                )
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path} as MovieLens u.data: {error}") from error
    metadata = _movielens_items(path.with_name("u.item"))
    items = sorted({interaction.item_id for interaction in interactions})
    catalogue = Catalogue(
        metadata.get(item, CatalogueItem(item, title=f"item {item}")) for item in items
    )
    return Dataset("MovieLens", interactions, catalogue, MOVIELENS_CITATION)


_GENRES_TEXT = (
    "unknown action adventure animation children comedy crime documentary drama fantasy "
    "film-noir horror musical mystery romance sci-fi thriller war western"
)
_GENRES = tuple(_GENRES_TEXT.split())


def _movielens_items(path: Path) -> dict[str, CatalogueItem]:
    if not path.exists():
        return {}
    items: dict[str, CatalogueItem] = {}
    with path.open(encoding="latin-1") as lines:
        for line in lines:
            fields = line.rstrip("\n").split("|")
            if len(fields) < 5 + len(_GENRES):
                continue
            flags = fields[5 : 5 + len(_GENRES)]
            genres = tuple(genre for genre, flag in zip(_GENRES, flags, strict=True) if flag == "1")
            items[fields[0]] = CatalogueItem(
                fields[0], title=fields[1], category=genres[0] if genres else "", tags=genres
            )
    return items


def load_online_retail(path: Path, settings: InteractionSettings | None = None) -> Dataset:
    """The UCI Online Retail CSV: purchases by customer, items described by their Description.

    Cancellations (InvoiceNo starting with C), rows without a CustomerID and non-positive
    quantities are skipped. Each row is a purchase (weight from `settings`). An item's title is
    its first Description, its category the description's last word that is not a colour, size
    or pattern (the kind of product: holder, lantern, mug), its tags the description's words
    (plurals folded), its price the first UnitPrice.
    """
    weight = (settings or InteractionSettings()).weight(EventType.PURCHASE)
    interactions: list[Interaction] = []
    items: dict[str, CatalogueItem] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            required = {"InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate"}
            if not required | {"CustomerID", "UnitPrice"} <= set(reader.fieldnames or ()):
                raise DataError(f"{path}: not the Online Retail columns")
            for row in reader:
                invoice, customer = row["InvoiceNo"].strip(), row["CustomerID"].strip()
                if invoice.startswith("C") or not customer or float(row["Quantity"]) <= 0:
                    continue
                customer = customer.removesuffix(".0")
                code = row["StockCode"].strip()
                moment = datetime.strptime(row["InvoiceDate"].strip(), "%Y-%m-%d %H:%M:%S")
                interactions.append(
                    Interaction(
                        customer,
                        code,
                        weight,
                        moment.replace(tzinfo=UTC).timestamp(),
                        EventType.PURCHASE,
                    )
                )
                if code not in items or not items[code].title:
                    items[code] = _retail_item(code, row["Description"], row["UnitPrice"])
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path} as Online Retail: {error}") from error
    return Dataset("Online Retail", interactions, Catalogue(items.values()), ONLINE_RETAIL_CITATION)


# Words that end many descriptions without saying what the product is ("... HOLDER RED").
_RETAIL_MODIFIERS_TEXT = (
    "red blue green pink white black ivory orange yellow purple cream grey gray gold silver "
    "brown natural pastel turquoise small large medium mini jumbo big giant design retrospot "
    "polkadot paisley spot spotty stripe striped vintage assorted printed finish colour set "
    "of in with and"
)
_RETAIL_MODIFIERS = frozenset(_RETAIL_MODIFIERS_TEXT.split())


def _retail_item(code: str, description: str, price: str) -> CatalogueItem:
    title = " ".join(description.replace("_", " ").split())
    words = [stem(word) for word in re.findall(r"[a-z]+", title.casefold())]
    kinds = [word for word in words if word not in _RETAIL_MODIFIERS and len(word) > 2]
    return CatalogueItem(
        code,
        title=title,
        category=kinds[-1] if kinds else (words[-1] if words else ""),
        tags=tuple(dict.fromkeys(word for word in words if len(word) > 2)),
        price=float(price) if price.strip() else 0.0,
    )


def load_csv(path: Path, settings: InteractionSettings | None = None) -> Dataset:
    """A CSV with a header: `person_id,item_id` and optionally `event_type`, `weight`,
    `timestamp` (epoch seconds or ISO 8601), `title`, `category`, `tags` (separated by `|`).

    Without `weight`, an event's weight comes from its type (`settings`), else it is 1.
    """
    rules = settings or InteractionSettings()
    interactions: list[Interaction] = []
    items: dict[str, CatalogueItem] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"person_id", "item_id"} <= set(reader.fieldnames or ()):
                raise DataError(f"{path}: needs a header with person_id and item_id")
            for row in reader:
                event_type = (row.get("event_type") or "").strip()
                if row.get("weight"):
                    weight = float(row["weight"])
                else:
                    weight = rules.weight(event_type) if event_type else 1.0
                interactions.append(
                    Interaction(
                        row["person_id"].strip(),
                        row["item_id"].strip(),
                        weight,
                        _moment(row.get("timestamp") or "0"),
                        event_type,
                    )
                )
                item_id = row["item_id"].strip()
                if item_id not in items:
                    tags = tuple(t.strip() for t in (row.get("tags") or "").split("|") if t.strip())
                    items[item_id] = CatalogueItem(
                        item_id,
                        title=(row.get("title") or "").strip(),
                        category=(row.get("category") or "").strip(),
                        tags=tags,
                    )
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path} as interactions CSV: {error}") from error
    return Dataset(path.name, interactions, Catalogue(items.values()))


def _moment(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def load_dataset(path: Path, data_format: DataFormat | str) -> Dataset:
    if data_format == "movielens":
        return load_movielens(path)
    if data_format == "online-retail":
        return load_online_retail(path)
    if data_format == "csv":
        return load_csv(path)
    raise DataError(f"unknown format {data_format!r}")


# Splits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Training interactions and, per person, the items held out for testing."""

    train: list[Interaction]
    test: dict[str, frozenset[str]]
    method: str


def _person_rng(seed: int, person_id: str) -> np.random.Generator:
    # Seeded per person, so one person's split never depends on who else is in the data.
    digest = hashlib.blake2b(person_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "big")])


def held_out_count(n_items: int, fraction: float) -> int:
    """Items held out of a person's n: none below two, else ⌊n·fraction⌋ but at least one."""
    return 0 if n_items < 2 else max(1, math.floor(n_items * fraction))


def random_split(
    interactions: Sequence[Interaction], fraction: float = 0.2, seed: int = 42
) -> Split:
    """Per person, `fraction` of their distinct items at random (all their interactions with a
    held-out item go to the test side)."""
    items_of: dict[str, set[str]] = defaultdict(set)
    for interaction in interactions:
        items_of[interaction.person_id].add(interaction.item_id)
    test: dict[str, frozenset[str]] = {}
    for person in sorted(items_of):
        items = sorted(items_of[person])
        count = held_out_count(len(items), fraction)
        if count:
            chosen = _person_rng(seed, person).permutation(len(items))[:count]
            test[person] = frozenset(items[position] for position in chosen)
    train = [i for i in interactions if i.item_id not in test.get(i.person_id, ())]
    return Split(train, test, "random")


def temporal_split(interactions: Sequence[Interaction], fraction: float = 0.2) -> Split:
    """Everything before the time that leaves `fraction` of interactions after it trains; each
    person's later items they had not interacted with before are their test items."""
    if not interactions:
        return Split([], {}, "temporal")
    times = np.sort(np.array([timestamp(i.occurred_at) for i in interactions]))
    cutoff = float(times[min(len(times) - 1, math.floor(len(times) * (1.0 - fraction)))])
    train = [i for i in interactions if timestamp(i.occurred_at) < cutoff]
    seen: dict[str, set[str]] = defaultdict(set)
    for interaction in train:
        seen[interaction.person_id].add(interaction.item_id)
    later: dict[str, set[str]] = defaultdict(set)
    for interaction in interactions:
        person = interaction.person_id
        late = timestamp(interaction.occurred_at) >= cutoff
        if late and person in seen and interaction.item_id not in seen[person]:
            later[person].add(interaction.item_id)
    return Split(train, {p: frozenset(items) for p, items in later.items() if items}, "temporal")


def split_interactions(
    interactions: Sequence[Interaction],
    method: SplitMethod | str,
    fraction: float = 0.2,
    seed: int = 42,
) -> Split:
    if method == "random":
        return random_split(interactions, fraction, seed)
    if method == "temporal":
        return temporal_split(interactions, fraction)
    raise ValueError(f"unknown split {method!r}")


def holdout_matrix(
    data: InteractionMatrix, fraction: float = 0.2, seed: int = 42, persons: int | None = None
) -> tuple[InteractionMatrix, dict[int, IntArray]]:
    """A validation split of a training matrix: per person (row), `fraction` of their items
    removed from the matrix and returned as that row's held-out indices (for tuning).

    With `persons`, only the first that many persons (in id order) with two or more items give
    up items; everyone else's rows stay whole.
    """
    matrix = data.matrix
    keep = np.ones(matrix.nnz, dtype=np.bool_)
    held: dict[int, IntArray] = {}
    for row, person in enumerate(data.persons):
        if persons is not None and len(held) >= persons:
            break
        start, stop = int(matrix.indptr[row]), int(matrix.indptr[row + 1])
        count = held_out_count(stop - start, fraction)
        if count:
            chosen = start + _person_rng(seed, person).permutation(stop - start)[:count]
            keep[chosen] = False
            held[row] = np.sort(np.asarray(matrix.indices[chosen], dtype=np.int64))
    rows = np.repeat(np.arange(data.n_persons), np.diff(matrix.indptr))
    reduced = sparse.csr_matrix(
        (matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape
    )
    return InteractionMatrix(data.persons, reduced, data.interaction_counts), held


# Metrics --------------------------------------------------------------------------------------


def precision_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    return sum(1 for item in ranked[:k] if item in wanted) / k if k > 0 else 0.0


def recall_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    return sum(1 for item in ranked[:k] if item in wanted) / len(wanted) if wanted else 0.0


def f1_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    precision, recall = precision_at_k(ranked, wanted, k), recall_at_k(ranked, wanted, k)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def ndcg_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    gains = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(ranked[:k]) if item in wanted)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(wanted))))
    return gains / ideal if ideal > 0 else 0.0


def average_precision_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    hits, total = 0, 0.0
    for rank, item in enumerate(ranked[:k], start=1):
        if item in wanted:
            hits += 1
            total += hits / rank
    denominator = min(k, len(wanted))
    return total / denominator if denominator else 0.0


def hit_at_k(ranked: Sequence[int], relevant: Iterable[int], k: int) -> float:
    wanted = set(relevant)
    return 1.0 if any(item in wanted for item in ranked[:k]) else 0.0


def coverage(lists: Iterable[Sequence[int]], n_items: int) -> float:
    recommended = {item for ranked in lists for item in ranked}
    return len(recommended) / n_items if n_items else 0.0


def novelty(
    lists: Iterable[Sequence[int]], persons_per_item: Sequence[int], n_persons: int
) -> float:
    values = [
        -math.log2((persons_per_item[item] + 1) / (n_persons + 1))
        for ranked in lists
        for item in ranked
    ]
    return sum(values) / len(values) if values else 0.0


PER_PERSON: Mapping[str, Callable[[Sequence[int], Iterable[int], int], float]] = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "f1": f1_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_at_k,
}


# The protocol ---------------------------------------------------------------------------------


class Scorer(Protocol):
    def score(self, history: History) -> FloatArray: ...


class Candidate(Protocol):
    """Anything that trains into a scorer: every `Model`, and the benchmark's reference."""

    @property
    def name(self) -> str: ...

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> Scorer: ...


def recommend_lists(
    scorer: Scorer,
    data: InteractionMatrix,
    rows: Sequence[int],
    k: int,
    advance: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Top k of all items for each row's history, the row's own items excluded."""
    lists = []
    for row in rows:
        history = data.row(row)
        scores = scorer.score(history).astype(np.float64, copy=True)
        scores[history.indices] = -np.inf
        lists.append(top_k(scores, k).tolist())
        if advance is not None:
            advance()
    return lists


def measure(
    lists: Sequence[Sequence[int]],
    relevant: Sequence[Iterable[int]],
    k: int,
    data: InteractionMatrix,
) -> dict[str, float]:
    """All metrics of recommendation lists against held-out items (`data` is the training)."""
    results = {
        name: float(
            np.mean(
                [metric(ranked, wanted, k) for ranked, wanted in zip(lists, relevant, strict=True)]
            )
        )
        if lists
        else 0.0
        for name, metric in PER_PERSON.items()
    }
    persons_per_item = np.bincount(data.matrix.indices, minlength=data.n_items).tolist()
    results["coverage"] = coverage(lists, data.n_items)
    results["novelty"] = novelty(lists, persons_per_item, data.n_persons)
    return results


def holdout_metrics(
    candidate: Candidate,
    data: InteractionMatrix,
    catalogue: Catalogue,
    *,
    k: int = 10,
    seed: int = 0,
    persons: int | None = 2_000,
) -> tuple[dict[str, float], int]:
    """Metrics at k of a model retrained without a seeded 20% of (up to `persons`) persons'
    items, and how many persons were measured: the offline figures `Train` reports beside a
    model trained on everything (the protocol of `run_evaluation` on a validation split)."""
    reduced, held = holdout_matrix(data, 0.2, seed, persons=persons)
    rows = sorted(held)
    lists = recommend_lists(candidate.train(reduced, catalogue), reduced, rows, k)
    return measure(lists, [held[row] for row in rows], k, reduced), len(rows)


@dataclass(frozen=True)
class ModelResult:
    name: str
    metrics: dict[str, float]
    training_seconds: float
    version: str = ""
    note: str = ""


@dataclass(frozen=True)
class EvaluationReport:
    dataset: str
    citation: str
    split: str
    k: int
    seed: int
    persons: int
    items: int
    interactions: int
    train_interactions: int
    evaluated_persons: int
    held_out_items: int
    results: list[ModelResult] = field(default_factory=list)

    def best(self, metric: str = "ndcg", exclude: Iterable[str] = ()) -> ModelResult:
        skip = set(exclude)
        return max((r for r in self.results if r.name not in skip), key=lambda r: r.metrics[metric])


@dataclass(frozen=True)
class PreparedSplit:
    """A split turned into a training matrix and held-out indices per training row."""

    train: InteractionMatrix
    rows: list[int]
    relevant: list[IntArray]


def prepare(
    dataset: Dataset,
    split: Split,
    settings: InteractionSettings,
) -> PreparedSplit:
    now = max((timestamp(i.occurred_at) for i in split.train), default=0.0)
    train = build_interaction_matrix(
        split.train, dataset.catalogue, now=now, half_life_days=settings.half_life_days
    )
    rows, relevant = [], []
    for person in sorted(split.test):
        row = train.person_index(person)
        held = dataset.catalogue.indices(sorted(split.test[person]))
        if row is not None and held.size:
            rows.append(row)
            relevant.append(held)
    return PreparedSplit(train, rows, relevant)


def default_candidates() -> list[Candidate]:
    return [build_model(name) for name in MODEL_NAMES]


def run_evaluation(
    dataset: Dataset,
    *,
    split: SplitMethod | str = "random",
    k: int = 10,
    seed: int = 42,
    fraction: float = 0.2,
    settings: InteractionSettings | None = None,
    candidates: Sequence[Candidate] | None = None,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Train every candidate on the training part and measure it on the held-out part."""
    rules = settings or InteractionSettings(half_life_days=None)
    parts = split_interactions(dataset.interactions, split, fraction, seed)
    prepared = prepare(dataset, parts, rules)
    report = EvaluationReport(
        dataset=dataset.name,
        citation=dataset.citation,
        split=parts.method,
        k=k,
        seed=seed,
        persons=dataset.persons,
        items=len(dataset.catalogue),
        interactions=len(dataset.interactions),
        train_interactions=len(parts.train),
        evaluated_persons=len(prepared.rows),
        held_out_items=int(sum(held.size for held in prepared.relevant)),
    )
    for candidate in candidates if candidates is not None else default_candidates():
        task = None
        if progress is not None:
            task = progress.add_task(f"training {candidate.name}", total=len(prepared.rows) + 1)
        started = time.perf_counter()
        trained = candidate.train(prepared.train, dataset.catalogue)
        seconds = time.perf_counter() - started
        advance: Callable[[], None] | None = None
        if progress is not None and task is not None:
            progress.update(task, advance=1, description=f"evaluating {candidate.name}")
            advance = functools.partial(progress.advance, task)
        lists = recommend_lists(trained, prepared.train, prepared.rows, k, advance)
        report_of = getattr(trained, "report", None)
        details = getattr(report_of, "details", {})
        tuned = f"λ={details['l2']:g}" if "l2" in details else ""
        report.results.append(
            ModelResult(
                name=candidate.name,
                metrics=measure(lists, prepared.relevant, k, prepared.train),
                training_seconds=seconds,
                version=str(getattr(report_of, "version", "")),
                note=str(getattr(trained, "note", "") or getattr(candidate, "note", "") or tuned),
            )
        )
        if progress is not None and task is not None:
            progress.update(task, description=f"done {candidate.name}")
    return report


def report_table(report: EvaluationReport, reference: str | None = None) -> Table:
    """The report as a table (fits 80 columns); the best row bold, the `reference` row dim."""
    seeded = f", seed {report.seed}" if report.split == "random" else ""
    table = Table(
        title=f"{report.dataset}: {report.split} split, k={report.k}{seeded}",
        caption=(
            f"{report.persons} persons, {report.items} items, {report.interactions} interactions; "
            f"trained on {report.train_interactions}, evaluated {report.evaluated_persons} persons "
            f"on {report.held_out_items} held-out items; full ranking, training items excluded; "
            "cover = catalogue coverage, novelty in bits"
        ),
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("model", no_wrap=True)
    for metric in METRICS:
        label = LABELS[metric] + ("" if metric in {"coverage", "novelty"} else f"@{report.k}")
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("secs", justify="right", no_wrap=True)
    best = report.best().name if report.results else ""
    for result in report.results:
        name = escape(result.name + (f" ({result.note})" if result.note else ""))
        if result.name == reference:
            name = f"[dim]{name}[/dim]"
        elif result.name == best:
            name = f"[bold]{name}[/bold]"
        table.add_row(
            name,
            *(f"{result.metrics[metric]:.3f}" for metric in METRICS[:-1]),
            f"{result.metrics['novelty']:.2f}",
            f"{result.training_seconds:.1f}",
        )
    return table
