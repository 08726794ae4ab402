"""Offline evaluation: metrics on hand-computed examples, splits, loaders and `steward eval`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import services.cli as cli
from services.recommend.evaluation import (
    METRICS,
    DataError,
    Dataset,
    average_precision_at_k,
    coverage,
    f1_at_k,
    held_out_count,
    hit_at_k,
    holdout_matrix,
    holdout_metrics,
    load_csv,
    load_dataset,
    load_movielens,
    load_online_retail,
    measure,
    ndcg_at_k,
    novelty,
    precision_at_k,
    random_split,
    recall_at_k,
    run_evaluation,
    temporal_split,
)
from services.recommend.interactions import Interaction, build_interaction_matrix
from services.recommend.models import Catalogue, CatalogueItem, build_model

runner = CliRunner()
DAY = 86_400

# Metrics --------------------------------------------------------------------------------------

RANKED = [3, 1, 7, 5, 9]
RELEVANT = {1, 5, 8}


def test_precision_recall_and_f1_at_k() -> None:
    assert precision_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 5)
    assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert f1_at_k(RANKED, RELEVANT, 5) == pytest.approx(0.5)  # 2·0.4·0.667 / 1.067
    assert precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 2)
    assert recall_at_k(RANKED, set(), 5) == 0.0
    assert f1_at_k(RANKED, {42}, 5) == 0.0


def test_ndcg_at_k() -> None:
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # hits at ranks 2 and 4
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # three relevant items could lead
    assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / ideal)
    assert ndcg_at_k([1, 5, 8], RELEVANT, 3) == pytest.approx(1.0)
    assert ndcg_at_k([2, 4], RELEVANT, 2) == 0.0
    # With one relevant item, the ideal is a hit at rank 1.
    assert ndcg_at_k([0, 7], {7}, 2) == pytest.approx(1 / math.log2(3))


def test_map_and_hit_rate_at_k() -> None:
    assert average_precision_at_k(RANKED, RELEVANT, 5) == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert average_precision_at_k([1, 5], RELEVANT, 2) == pytest.approx(1.0)
    assert average_precision_at_k([0, 0], RELEVANT, 2) == 0.0
    assert hit_at_k(RANKED, RELEVANT, 5) == 1.0
    assert hit_at_k(RANKED, RELEVANT, 1) == 0.0


def test_coverage_and_novelty() -> None:
    assert coverage([[1, 2], [2, 3]], 10) == pytest.approx(0.3)
    # p(item 0) = (3 + 1) / (3 + 1) = 1 → 0 bits; p(item 1) = (0 + 1) / 4 → 2 bits.
    assert novelty([[0], [1]], [3, 0], 3) == pytest.approx(1.0)
    assert novelty([], [1], 1) == 0.0


def test_measure_averages_over_persons() -> None:
    catalogue = Catalogue(CatalogueItem(f"i{j}") for j in range(4))
    data = build_interaction_matrix(
        [("a", "i0", 1.0, 0), ("b", "i0", 1.0, 0), ("b", "i1", 1.0, 0)], catalogue, now=0
    )
    results = measure([[2, 3], [3, 2]], [np.array([2]), np.array([1])], 2, data)
    assert results["precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert results["hit_rate"] == pytest.approx(0.5)
    assert results["coverage"] == pytest.approx(0.5)
    assert results["novelty"] == pytest.approx(-math.log2(1 / 3))


# Splits ---------------------------------------------------------------------------------------


def many_interactions() -> list[Interaction]:
    rng = np.random.default_rng(3)
    return [
        Interaction(f"p{person}", f"i{item}", 1.0, float(rng.integers(0, 100 * DAY)))
        for person in range(30)
        for item in rng.choice(40, size=int(rng.integers(1, 15)), replace=False)
    ]


def test_random_split_is_deterministic_with_a_seed_and_holds_out_a_fifth() -> None:
    interactions = many_interactions()
    first, again = random_split(interactions, 0.2, seed=1), random_split(interactions, 0.2, seed=1)
    assert first.test == again.test and first.train == again.train
    assert random_split(interactions, 0.2, seed=2).test != first.test
    items_of: dict[str, set[str]] = {}
    for interaction in interactions:
        items_of.setdefault(interaction.person_id, set()).add(interaction.item_id)
    for person, items in items_of.items():
        held = first.test.get(person, frozenset())
        assert len(held) == held_out_count(len(items), 0.2)
        assert held <= items
    assert all(i.item_id not in first.test.get(i.person_id, ()) for i in first.train)
    assert len(first.train) + sum(len(held) for held in first.test.values()) == len(interactions)


def test_a_persons_split_does_not_depend_on_other_persons() -> None:
    interactions = many_interactions()
    alone = [i for i in interactions if i.person_id == "p7"]
    assert random_split(alone, seed=5).test["p7"] == random_split(interactions, seed=5).test["p7"]


def test_held_out_count() -> None:
    assert [held_out_count(n, 0.2) for n in (0, 1, 2, 9, 10, 14, 15)] == [0, 0, 1, 1, 2, 2, 3]


def test_temporal_split_tests_later_new_items_of_known_persons() -> None:
    interactions = [
        Interaction("a", "x", 1.0, 1),
        Interaction("a", "y", 1.0, 2),
        Interaction("b", "x", 1.0, 3),
        Interaction("a", "x", 1.0, 4),  # later, but already known: not a test item
        Interaction("a", "z", 1.0, 5),
        Interaction("c", "z", 1.0, 5),  # nobody knew c before: not evaluated
    ]
    split = temporal_split(interactions, fraction=0.5)
    assert [i.occurred_at for i in split.train] == [1, 2, 3]
    assert split.test == {"a": frozenset({"z"})}


def test_holdout_matrix_removes_held_items_from_rows() -> None:
    catalogue = Catalogue(CatalogueItem(f"i{j}") for j in range(12))
    data = build_interaction_matrix(
        [(f"p{p}", f"i{j}", 1.0, 0) for p in range(3) for j in range(p * 3, p * 3 + 5)],
        catalogue,
        now=0,
    )
    reduced, held = holdout_matrix(data, 0.2, seed=4)
    assert sorted(held) == [0, 1, 2]
    for row, items in held.items():
        assert items.size == 1
        assert items[0] in data.row(row).indices
        assert items[0] not in reduced.row(row).indices
        assert reduced.row(row).indices.size == 4
    limited, held_one = holdout_matrix(data, 0.2, seed=4, persons=1)
    assert list(held_one) == [0] and limited.row(1).indices.size == 5


# Loaders --------------------------------------------------------------------------------------


def write_movielens(directory: Path, with_items: bool = False) -> Path:
    rows = []
    for user in range(1, 13):
        for item in range(1, 9):
            if (user + item) % 3 != 0:
                rows.append(
                    f"{user}\t{item}\t{1 + (user * item) % 5}\t{880000000 + user * 100 + item}"
                )
    path = directory / "u.data"
    path.write_text("\n".join(rows) + "\n", encoding="latin-1")
    if with_items:
        flags = ["0"] * 19
        lines = []
        for item in range(1, 9):
            genre = flags[:]
            genre[1 + item % 3] = "1"
            lines.append(f"{item}|Film {item} (1995)|01-Jan-1995||http://x|" + "|".join(genre))
        (directory / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return path


def test_movielens_loader_reads_user_item_rating_timestamp(tmp_path: Path) -> None:
    dataset = load_movielens(write_movielens(tmp_path))
    assert dataset.persons == 12
    assert len(dataset.catalogue) == 8
    first = dataset.interactions[0]
    assert (first.person_id, first.item_id, first.weight, first.occurred_at) == (
        "1",
        "1",
        1.0,
        880000101.0,
    )
    assert "MovieLens" in dataset.citation
    assert len(load_movielens(tmp_path / "u.data", min_rating=4).interactions) < len(
        dataset.interactions
    )


def test_movielens_loader_takes_titles_and_genres_from_u_item(tmp_path: Path) -> None:
    dataset = load_movielens(write_movielens(tmp_path, with_items=True))
    film = dataset.catalogue.items[dataset.catalogue.index("2")]
    assert film.title == "Film 2 (1995)"
    assert film.category == "animation" and film.tags == ("animation",)


def test_movielens_loader_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.data"
    path.write_text("just,a,csv\n", encoding="utf-8")
    with pytest.raises(DataError):
        load_movielens(path)


RETAIL = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE_HANGING_HEART_T-LIGHT_HOLDER,6,2010-12-01 08:26:00,2.55,17850,United_Kingdom
536365,71053,WHITE_METAL_LANTERN,6,2010-12-01 08:26:00,3.39,17850,United_Kingdom
536366,22633,HAND_WARMER_UNION_JACK,6,2010-12-01 08:28:00,1.85,17850,United_Kingdom
536367,84879,ASSORTED_COLOUR_BIRD_ORNAMENT,32,2010-12-01 08:34:00,1.69,13047,United_Kingdom
536367,22745,POPPY'S_PLAYHOUSE_BEDROOM_,6,2010-12-01 08:34:00,2.10,13047,United_Kingdom
C536379,D,Discount,-1,2010-12-01 09:41:00,27.5,14527,United_Kingdom
536414,22139,,56,2010-12-01 11:52:00,0,,United_Kingdom
536420,85123A,WHITE_HANGING_HEART_T-LIGHT_HOLDER,12,2010-12-02 10:00:00,2.55,13047,United_Kingdom
536421,22752,SET_7_BABUSHKA_NESTING_BOXES,2,2010-12-03 10:00:00,7.65,12583.0,France
"""


def test_online_retail_loader_skips_cancellations_and_anonymous_rows(tmp_path: Path) -> None:
    path = tmp_path / "retail.csv"
    path.write_text(RETAIL, encoding="utf-8")
    dataset = load_online_retail(path)
    assert len(dataset.interactions) == 7
    assert {i.person_id for i in dataset.interactions} == {"17850", "13047", "12583"}
    assert "D" not in dataset.catalogue and "22139" not in dataset.catalogue
    holder = dataset.catalogue.items[dataset.catalogue.index("85123A")]
    assert holder.title == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert holder.category == "holder"
    assert "heart" in holder.tags and holder.price == 2.55
    ornament = dataset.catalogue.items[dataset.catalogue.index("84879")]
    assert ornament.category == "ornament"
    boxes = dataset.catalogue.items[dataset.catalogue.index("22752")]
    assert boxes.category == "box"
    assert "Online Retail" in dataset.citation and "CC BY 4.0" in dataset.citation
    assert dataset.interactions[0].occurred_at == pytest.approx(1291191960.0)


def test_csv_loader_reads_event_types_and_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "person_id,item_id,event_type,timestamp,title,category,tags\n"
        "a,kettle,purchase,2024-05-01T10:00:00+00:00,Kettle,kitchen,steel|kettle\n"
        "a,mug,view,1714557600,Mug,kitchen,\n",
        encoding="utf-8",
    )
    dataset = load_csv(path)
    assert [i.weight for i in dataset.interactions] == [8.0, 1.0]
    assert dataset.interactions[0].occurred_at == 1714557600.0
    kettle = dataset.catalogue.items[dataset.catalogue.index("kettle")]
    assert kettle.tags == ("steel", "kettle") and kettle.category == "kitchen"
    missing = tmp_path / "missing.csv"
    missing.write_text("user,item\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="person_id"):
        load_dataset(missing, "csv")


# The protocol ---------------------------------------------------------------------------------


def test_every_model_is_trained_and_measured(tmp_path: Path) -> None:
    dataset = load_movielens(write_movielens(tmp_path))
    report = run_evaluation(dataset, split="random", k=3, seed=1)
    assert [result.name for result in report.results] == [
        "popular",
        "item_knn",
        "ease",
        "content",
        "hybrid",
    ]
    for result in report.results:
        assert 0.0 <= result.metrics["ndcg"] <= 1.0
        assert 0.0 <= result.metrics["coverage"] <= 1.0
        assert result.version.startswith(result.name)
    assert report.evaluated_persons == 12
    again = run_evaluation(dataset, split="random", k=3, seed=1)
    assert [r.metrics for r in again.results] == [r.metrics for r in report.results]


def test_training_items_are_never_recommended(tmp_path: Path) -> None:
    dataset = Dataset(
        "tiny",
        [Interaction(p, i, 1.0, 0) for p in ("a", "b") for i in ("x", "y", "z")],
        Catalogue(CatalogueItem(i) for i in ("x", "y", "z", "w")),
    )
    report = run_evaluation(dataset, k=3, candidates=[build_model("popular")])
    # Each person trains on two items and holds out one: the one left plus w are all that remain.
    assert report.results[0].metrics["hit_rate"] == 1.0


def test_holdout_metrics_measure_a_model_on_its_own_training_data(tmp_path: Path) -> None:
    dataset = load_movielens(write_movielens(tmp_path))
    data = build_interaction_matrix(dataset.interactions, dataset.catalogue, now=0)
    model = build_model("item_knn")
    metrics, persons = holdout_metrics(model, data, dataset.catalogue, k=3)
    assert set(metrics) == set(METRICS)
    assert persons == sum(1 for row in range(data.n_persons) if data.matrix[row].nnz >= 2)
    assert (metrics, persons) == holdout_metrics(model, data, dataset.catalogue, k=3)
    _, one = holdout_metrics(model, data, dataset.catalogue, k=3, persons=1)
    assert one == 1


# `steward eval` -------------------------------------------------------------------------------


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=160))


@pytest.mark.usefixtures("wide_console")
def test_steward_eval_prints_metrics_per_model(tmp_path: Path) -> None:
    path = write_movielens(tmp_path)
    result = runner.invoke(
        cli.app,
        ["eval", "--interactions", str(path), "--format", "movielens", "--k", "5"],
    )
    assert result.exit_code == 0, result.output
    for name in ("popular", "item_knn", "ease", "content", "hybrid"):
        assert name in result.output
    for label in ("P@5", "R@5", "F1@5", "NDCG@5", "MAP@5", "HR@5", "cover", "novelty"):
        assert label in result.output
    assert "Harper and J. A. Konstan" in result.output


@pytest.mark.usefixtures("wide_console")
def test_steward_eval_temporal_split_of_one_model(tmp_path: Path) -> None:
    path = write_movielens(tmp_path)
    result = runner.invoke(
        cli.app,
        [
            "eval",
            "--interactions",
            str(path),
            "--format",
            "movielens",
            "--split",
            "temporal",
            "--model",
            "item_knn",
            "--half-life-days",
            "30",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "temporal split" in result.output
    assert "item_knn" in result.output and "hybrid" not in result.output


def test_steward_eval_refuses_bad_arguments_and_files(tmp_path: Path) -> None:
    path = write_movielens(tmp_path)
    bad_format = runner.invoke(cli.app, ["eval", "--interactions", str(path), "--format", "xml"])
    assert bad_format.exit_code == 2
    bad_model = runner.invoke(
        cli.app, ["eval", "--interactions", str(path), "--format", "movielens", "--model", "x"]
    )
    assert bad_model.exit_code == 2
    unreadable = runner.invoke(
        cli.app,
        ["eval", "--interactions", str(tmp_path / "absent"), "--format", "movielens"],
    )
    assert unreadable.exit_code == 2
