"""Offline quality of the recommenders beside a plain EASE reference, on real data.

Runs the protocol of `steward eval` (services/recommend/evaluation.py: the same splits and
metrics) on the UCI Online Retail slice, with a random and a temporal split, and on MovieLens
100K when `--movielens PATH/u.data` is given (not shipped: its licence forbids redistribution),
or fetched with `--fetch-movielens DIR`: the RecBole 1.2.1 wheel on PyPI (MIT licence) carries
the MovieLens 100K ratings as `recbole/dataset_example/ml-100k/ml-100k.inter` (u.data with a
header line) and the movies as `ml-100k.item`; this script downloads that wheel with pip, checks
its SHA-256, and writes `u.data` and `u.item` into DIR for this run (GroupLens's terms apply:
use for research, no redistribution, cite Harper and Konstan 2015).
Beside our models it trains a plain EASE (Steck 2019) written here in a dozen lines of numpy,
with λ tuned on a validation part carved out of the training part, and says whether our best
model matches it on NDCG@10. Figures only: nothing is asserted. Run from the repository root::

    .venv/bin/python bench/recommend_eval.py [--movielens ~/ml-100k/u.data] [--k 10] [--seed 42]
    .venv/bin/python bench/recommend_eval.py --fetch-movielens /tmp/ml-100k
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from rich.console import Console
from rich.progress import Progress

from services.recommend.evaluation import (
    Candidate,
    Dataset,
    EvaluationReport,
    SplitMethod,
    default_candidates,
    holdout_matrix,
    load_movielens,
    load_online_retail,
    measure,
    recommend_lists,
    report_table,
    run_evaluation,
)
from services.recommend.models.base import Catalogue, FloatArray, History, InteractionMatrix

ONLINE_RETAIL: Final = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail_20k.csv"
)
REFERENCE: Final = "EASE reference"
RECBOLE: Final = "recbole==1.2.1"
RECBOLE_WHEEL: Final = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256: Final = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_ML100K: Final = "recbole/dataset_example/ml-100k/ml-100k"
MOVIELENS_GENRES: Final = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
LAMBDAS: Final = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


@dataclass(frozen=True)
class PlainEASEScorer:
    weights: FloatArray

    def score(self, history: History) -> FloatArray:
        # x·B for a binary x is the sum of the history's rows of B.
        return np.asarray(self.weights[history.indices].sum(axis=0), dtype=np.float64)


def plain_ease(data: InteractionMatrix, l2: float) -> PlainEASEScorer:
    """EASE on the binarised matrix: B = I - P·diagMat(1/diag(P)), P = (XᵀX + λI)⁻¹."""
    x = (data.matrix.toarray() > 0).astype(np.float64)
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return PlainEASEScorer(b)


@dataclass
class TunedPlainEASE:
    """The reference: λ chosen by NDCG@k on a validation part of the training data."""

    k: int
    seed: int
    name: str = REFERENCE
    note: str = ""

    def train(self, data: InteractionMatrix, catalogue: Catalogue) -> PlainEASEScorer:
        reduced, held = holdout_matrix(data, 0.2, self.seed)
        rows = sorted(held)
        best_l2, best_ndcg = LAMBDAS[0], -1.0
        for l2 in LAMBDAS:
            lists = recommend_lists(plain_ease(reduced, l2), reduced, rows, self.k)
            ndcg = measure(lists, [held[row] for row in rows], self.k, reduced)["ndcg"]
            if ndcg > best_ndcg:
                best_l2, best_ndcg = l2, ndcg
        self.note = f"λ={best_l2:g}"
        return plain_ease(data, best_l2)


def fetch_movielens(directory: Path) -> Path:
    """MovieLens 100K `u.data` and `u.item` in `directory`, from the RecBole wheel on PyPI."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / RECBOLE_WHEEL
    if not wheel.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                RECBOLE,
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(directory),
                "--quiet",
            ],
            check=True,
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != RECBOLE_WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest}, expected {RECBOLE_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        ratings = archive.read(f"{RECBOLE_ML100K}.inter").decode("latin-1").splitlines()
        movies = archive.read(f"{RECBOLE_ML100K}.item").decode("latin-1").splitlines()
    if ratings[0].split("\t")[:4] != [
        "user_id:token",
        "item_id:token",
        "rating:float",
        "timestamp:float",
    ]:
        raise SystemExit(f"unexpected header in {RECBOLE_ML100K}.inter: {ratings[0]!r}")
    path = directory / "u.data"
    path.write_text("\n".join(ratings[1:]) + "\n", encoding="latin-1")
    items = []
    for line in movies[1:]:
        item_id, title, year, genres = line.split("\t")
        flags = ["1" if genre in genres.split() else "0" for genre in MOVIELENS_GENRES]
        named = f"{title} ({year})" if year else title
        items.append("|".join([item_id, named, "", "", "", *flags]))
    (directory / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    print(
        f"MovieLens 100K from {RECBOLE_WHEEL} (PyPI, SHA-256 {digest[:16]}…): "
        f"{len(ratings) - 1:,} ratings in {path} (SHA-256 "
        f"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}…), {len(items):,} movies"
    )
    return path


def evaluate(
    console: Console, dataset: Dataset, split: SplitMethod, k: int, seed: int
) -> EvaluationReport:
    reference = TunedPlainEASE(k, seed)
    candidates: list[Candidate] = [*default_candidates(), reference]
    with Progress(console=console, transient=True) as progress:
        report = run_evaluation(
            dataset, split=split, k=k, seed=seed, candidates=candidates, progress=progress
        )
    console.print(report_table(report, reference=REFERENCE))
    ours = report.best("ndcg", exclude=[REFERENCE])
    theirs = next(result for result in report.results if result.name == REFERENCE)
    verdict = "matches or beats" if ours.metrics["ndcg"] >= theirs.metrics["ndcg"] else "TRAILS"
    console.print(
        f"best of ours: {ours.name}, NDCG@{k} {ours.metrics['ndcg']:.4f} {verdict} the plain EASE "
        f"reference ({theirs.note}) at {theirs.metrics['ndcg']:.4f}\n"
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online-retail", type=Path, default=ONLINE_RETAIL)
    parser.add_argument("--movielens", type=Path, help="MovieLens 100K u.data (not shipped)")
    parser.add_argument(
        "--fetch-movielens",
        type=Path,
        metavar="DIR",
        help="fetch MovieLens 100K from the RecBole wheel on PyPI into DIR and evaluate on it",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    arguments = parser.parse_args()
    console = Console(width=130)
    retail = load_online_retail(arguments.online_retail)
    for split in ("random", "temporal"):
        evaluate(console, retail, split, arguments.k, arguments.seed)
    console.print(retail.citation, soft_wrap=True)
    if arguments.fetch_movielens is not None:
        arguments.movielens = fetch_movielens(arguments.fetch_movielens)
    if arguments.movielens is not None:
        movielens = load_movielens(arguments.movielens)
        evaluate(console, movielens, "random", arguments.k, arguments.seed)
        console.print(movielens.citation, soft_wrap=True)


if __name__ == "__main__":
    main()
