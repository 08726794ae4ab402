"""Recommender models and interactions: closed forms, weighting, decay, fallbacks, unlearning."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.recommend.interactions import (
    VERBS,
    EventType,
    Interaction,
    InteractionSettings,
    build_history,
    build_interaction_matrix,
    decay,
)
from services.recommend.models import (
    MODEL_NAMES,
    Catalogue,
    CatalogueItem,
    ContentModel,
    EASEConfig,
    EASEModel,
    History,
    HybridModel,
    InteractionMatrix,
    ItemKNNConfig,
    ItemKNNModel,
    PopularConfig,
    PopularModel,
    build_model,
)
from services.recommend.models.base import FROM_INTERACTIONS
from services.recommend.models.item_knn import weigh_item_person

DAY = 86_400.0
NOW = 1_000 * DAY
SETTINGS = InteractionSettings()

CATALOGUE = Catalogue(
    [
        CatalogueItem("kettle-red", "Red kettle", "kitchen", ("red", "kettle", "steel"), 30.0),
        CatalogueItem(
            "kettle-black", "Black kettle", "kitchen", ("black", "kettle", "steel"), 35.0
        ),
        CatalogueItem("mug-red", "Red mug", "kitchen", ("red", "mug", "ceramic"), 8.0),
        CatalogueItem("toaster", "Toaster", "kitchen", ("toaster", "steel"), 40.0),
        CatalogueItem("rake", "Garden rake", "garden", ("rake", "steel"), 20.0),
        CatalogueItem("hose", "Garden hose", "garden", ("hose",), 25.0),
        CatalogueItem("gloves", "Garden gloves", "garden", ("gloves",), 9.0),
        CatalogueItem("novel", "A novel", "books", ("fiction",), 12.0),
        CatalogueItem("atlas", "World atlas", "books", ("maps",), 25.0),
        CatalogueItem("cookbook", "Cookbook", "books", ("kitchen", "recipes"), 18.0),
        # Nobody has touched it yet: only content can recommend it.
        CatalogueItem(
            "kettle-retro", "Retro kettle", "kitchen", ("kettle", "retro", "steel"), 45.0
        ),
    ]
)
CLUSTERS = {
    "kitchen": ["kettle-red", "kettle-black", "mug-red", "toaster", "cookbook"],
    "garden": ["rake", "hose", "gloves"],
    "books": ["novel", "atlas", "cookbook"],
}
EVENTS = [EventType.VIEW, EventType.VIEW, EventType.ADD_TO_CART, EventType.PURCHASE]


def synthetic_interactions(seed: int = 7) -> list[Interaction]:
    """Persons who mostly stay in one cluster, plus `forget-me`, who bridges kitchen and books."""
    rng = random.Random(seed)
    interactions = []
    for number in range(18):
        cluster = list(CLUSTERS)[number % 3]
        items = rng.sample(CLUSTERS[cluster], k=rng.randint(2, len(CLUSTERS[cluster])))
        if rng.random() < 0.3:
            items.append(rng.choice(CATALOGUE.item_ids[:-1]))
        for item in items:
            for _ in range(rng.randint(1, 2)):
                event = rng.choice(EVENTS)
                moment = NOW - rng.uniform(0, 90) * DAY
                interactions.append(
                    Interaction(f"p{number:02d}", item, SETTINGS.weight(event), moment, event)
                )
    for item in ("kettle-red", "atlas", "hose"):
        weight = SETTINGS.weight(EventType.PURCHASE)
        interactions.append(Interaction("forget-me", item, weight, NOW - DAY, EventType.PURCHASE))
    return interactions


def matrix_of(
    interactions: list[Interaction], half_life_days: float | None = 30.0
) -> InteractionMatrix:
    return build_interaction_matrix(interactions, CATALOGUE, now=NOW, half_life_days=half_life_days)


def small_matrix(rows: list[list[float]]) -> tuple[InteractionMatrix, Catalogue]:
    """A persons x items matrix given densely, over a catalogue i0, i1, ..."""
    dense = np.array(rows, dtype=np.float64)
    catalogue = Catalogue(CatalogueItem(f"i{j}") for j in range(dense.shape[1]))
    interactions = [
        Interaction(f"u{i}", f"i{j}", float(dense[i, j]), NOW)
        for i in range(dense.shape[0])
        for j in range(dense.shape[1])
        if dense[i, j] > 0
    ]
    return build_interaction_matrix(interactions, catalogue, now=NOW), catalogue


def index(item_id: str) -> int:
    return CATALOGUE.index(item_id)


# Interactions ---------------------------------------------------------------------------------


def test_event_weights_follow_the_type_and_the_dwell_threshold() -> None:
    settings = InteractionSettings(
        weights={"view": 1.0, "dwell": 2.0, "purchase": 10.0}, dwell_threshold_seconds=20.0
    )
    assert settings.weight("view") == 1.0
    assert settings.weight("purchase") == 10.0
    assert settings.weight("dwell", dwell_seconds=25.0) == 2.0
    assert settings.weight("dwell", dwell_seconds=5.0) == 0.0
    assert settings.weight("dwell") == 0.0
    assert settings.weight("unknown_event") == 0.0


def test_half_life_halves_the_weight_of_old_interactions() -> None:
    ages = np.array([0.0, 7 * DAY, 14 * DAY, -DAY])
    np.testing.assert_allclose(decay(ages, 7 * DAY), [1.0, 0.5, 0.25, 1.0])
    assert np.array_equal(decay(ages, None), np.ones(4))
    matrix = build_interaction_matrix(
        [("p", "rake", 8.0, NOW - 7 * DAY), ("p", "rake", 2.0, NOW)],
        CATALOGUE,
        now=NOW,
        half_life_days=7.0,
    )
    assert matrix.history("p").weights.tolist() == [8.0 * 0.5 + 2.0]


def test_matrix_is_a_pure_function_of_the_interaction_set() -> None:
    interactions = synthetic_interactions()
    shuffled = interactions[:]
    random.Random(1).shuffle(shuffled)
    first, second = matrix_of(interactions), matrix_of(shuffled)
    assert first.persons == second.persons
    assert first.fingerprint() == second.fingerprint()
    assert np.array_equal(first.matrix.data, second.matrix.data)


def test_matrix_skips_unknown_items_and_zero_weights() -> None:
    matrix = build_interaction_matrix(
        [("p", "rake", 1.0, NOW), ("p", "no-such-item", 1.0, NOW), ("q", "hose", 0.0, NOW)],
        CATALOGUE,
        now=NOW,
    )
    assert matrix.persons == ("p",)
    assert matrix.history("p").indices.tolist() == [index("rake")]


def test_request_time_history_equals_the_training_row_and_names_verbs() -> None:
    interactions = synthetic_interactions()
    matrix = matrix_of(interactions)
    mine = [
        (i.item_id, i.weight, i.occurred_at, i.event_type)
        for i in interactions
        if i.person_id == "forget-me"
    ]
    history = build_history(mine, CATALOGUE, now=NOW, half_life_days=30.0)
    row = matrix.history("forget-me")
    assert np.array_equal(history.indices, row.indices)
    assert np.array_equal(history.weights, row.weights)
    assert history.verbs == ("bought", "bought", "bought")
    mixed = build_history(
        [
            ("rake", 1.0, NOW, "view"),
            ("rake", 8.0, NOW - DAY, "purchase"),
            ("hose", 4.0, NOW, "add_to_cart"),
        ],
        CATALOGUE,
        now=NOW,
    )
    assert dict(zip(mixed.indices.tolist(), mixed.verbs, strict=True)) == {
        index("rake"): "bought",
        index("hose"): "added to cart",
    }


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), events=st.integers(1, 60))
def test_request_time_history_equals_the_training_row_to_the_bit(seed: int, events: int) -> None:
    """Many events on few items (numpy sums groups of 8 or more pairwise), repeated times and
    weights (ties in the sort), and events in the future."""
    rng = random.Random(seed)
    kinds = {"view": 1.0, "dwell": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
    mine = []
    for _ in range(events):
        kind = rng.choice(list(kinds))
        moment = NOW - rng.choice([0.0, DAY, 3 * DAY, rng.random() * 90 * DAY, -DAY])
        mine.append(
            (rng.choice(CATALOGUE.item_ids[:3]), kinds[kind] * rng.choice([1, 0.5]), moment, kind)
        )
    matrix = build_interaction_matrix(
        [("p", *event[:3]) for event in mine], CATALOGUE, now=NOW, half_life_days=30.0
    )
    history = build_history(mine, CATALOGUE, now=NOW, half_life_days=30.0)
    row = matrix.history("p")
    assert history.indices.tolist() == row.indices.tolist()
    assert history.weights.tobytes() == row.weights.tobytes()
    for item, verb in zip(history.indices.tolist(), history.verbs, strict=True):
        # The heaviest event names the item: the latest among equals, then the last given.
        _, _, heaviest = max(
            (event[1], event[2], position)
            for position, event in enumerate(mine)
            if CATALOGUE.index(event[0]) == item
        )
        assert verb == VERBS[mine[heaviest][3]]


# EASE -----------------------------------------------------------------------------------------


def test_ease_matches_the_closed_form() -> None:
    data, catalogue = small_matrix(
        [[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    )
    l2 = 2.0
    trained = EASEModel(EASEConfig(l2=l2, l2_grid=())).train(data, catalogue)
    x = data.matrix.toarray()
    p = np.linalg.inv(x.T @ x + l2 * np.eye(5))
    expected = np.eye(5) - p @ np.diag(1.0 / np.diag(p))
    np.testing.assert_allclose(trained.weights, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(trained.weights) == 0.0)
    history = History.of_items([0, 3])
    np.testing.assert_allclose(
        trained.score(history), expected[0] + expected[3], rtol=1e-5, atol=1e-6
    )
    assert trained.report.details["l2"] == l2


def test_ease_tunes_lambda_on_a_validation_part_deterministically() -> None:
    data = matrix_of(synthetic_interactions())
    model = EASEModel(EASEConfig(l2_grid=(1.0, 10.0, 100.0)))
    first, second = model.train(data, CATALOGUE), model.train(data, CATALOGUE)
    assert first.report.details["l2"] in (1.0, 10.0, 100.0)
    assert np.array_equal(first.weights, second.weights)
    assert first.report.version == second.report.version


def test_ease_covers_only_the_most_interacted_items_above_its_size_limit() -> None:
    data, catalogue = small_matrix([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    trained = EASEModel(EASEConfig(l2=1.0, l2_grid=(), max_items=3)).train(data, catalogue)
    assert trained.covered.tolist() == [0, 1, 2]
    assert trained.report.items == 3
    scores = trained.score(History.of_items([0, 3]))
    assert scores[3] == 0.0
    assert scores[2] != 0.0


# Item kNN -------------------------------------------------------------------------------------


def test_item_knn_keeps_the_top_m_cosine_neighbours_per_item() -> None:
    data, catalogue = small_matrix(
        [[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    )
    trained = ItemKNNModel(ItemKNNConfig(neighbours=2, weighting="none")).train(data, catalogue)
    x = data.matrix.toarray()
    unit = x / np.linalg.norm(x, axis=0)
    cosine = unit.T @ unit
    np.fill_diagonal(cosine, 0.0)
    expected = np.zeros_like(cosine)
    for row in range(5):
        keep = np.lexsort((np.arange(5), -cosine[row]))[:2]
        expected[row, keep] = cosine[row, keep]
    similarity = trained.similarity.toarray()
    np.testing.assert_allclose(similarity, expected, atol=1e-12)
    assert np.diff(trained.similarity.indptr).max() <= 2
    history = History(np.array([0, 2]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(trained.score(history), similarity[0] + 3.0 * similarity[2])
    assert trained.similar(0, 1).tolist() == [int(np.argmax(expected[0]))]
    # Each answer row holds what each history item added to it, repeated items included.
    items = np.array([4, 1, 3, 1], dtype=np.int64)
    explained = trained.contributions(history, items)[FROM_INTERACTIONS]
    np.testing.assert_array_equal(
        explained, (similarity[[0, 2]] * np.array([1.0, 3.0])[:, None])[:, items].T
    )


def test_item_knn_weighting_is_bm25_or_tfidf_over_persons() -> None:
    item_person = np.array([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    n_items = 4
    items_per_person = (item_person > 0).sum(axis=0)
    config = ItemKNNConfig(k1=1.2, b=0.75)
    bm25 = weigh_item_person(item_person, config).toarray()
    idf = np.log(1 + (n_items - items_per_person + 0.5) / (items_per_person + 0.5))
    length = item_person.sum(axis=1)
    norm = 1.2 * (1 - 0.75 + 0.75 * length / length.mean())
    expected = np.where(
        item_person > 0, item_person * 2.2 / (item_person + norm[:, None]) * idf[None, :], 0.0
    )
    np.testing.assert_allclose(bm25, expected)
    tfidf = weigh_item_person(item_person, ItemKNNConfig(weighting="tfidf")).toarray()
    np.testing.assert_allclose(tfidf, item_person * np.log(n_items / items_per_person)[None, :])


def test_bm25_weighting_damps_persons_who_touch_everything() -> None:
    # u0 bought everything; u1 and u2 each bought a pair: the pairs should be the neighbours.
    data, catalogue = small_matrix([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    plain = ItemKNNModel(ItemKNNConfig(weighting="none")).train(data, catalogue)
    bm25 = ItemKNNModel(ItemKNNConfig(weighting="bm25")).train(data, catalogue)
    plain_gap = plain.similarity[0, 1] - plain.similarity[0, 2]
    bm25_gap = bm25.similarity[0, 1] - bm25.similarity[0, 2]
    assert bm25_gap > plain_gap > 0


# Popular --------------------------------------------------------------------------------------


def test_popularity_decays_so_recent_interest_outranks_old() -> None:
    old = [Interaction(f"o{n}", "novel", 8.0, NOW - 60 * DAY) for n in range(3)]
    recent = [Interaction("r0", "atlas", 8.0, NOW)]
    decayed = PopularModel().train(matrix_of(old + recent, half_life_days=7.0), CATALOGUE)
    assert (
        decayed.score(History.empty())[index("atlas")]
        > decayed.score(History.empty())[index("novel")]
    )
    undecayed = PopularModel().train(matrix_of(old + recent, half_life_days=None), CATALOGUE)
    scores = undecayed.score(History.empty())
    assert scores[index("novel")] > scores[index("atlas")]
    assert scores.max() == 1.0


def test_popularity_per_category_and_damping() -> None:
    interactions = [
        Interaction("a", "rake", 8.0, NOW),
        Interaction("b", "rake", 8.0, NOW),
        Interaction("c", "rake", 8.0, NOW),
        Interaction("d", "hose", 8.0, NOW),
        Interaction("wholesale", "gloves", 80.0, NOW),
        Interaction("a", "novel", 1.0, NOW),
    ]
    data = matrix_of(interactions)
    damped = PopularModel().train(data, CATALOGUE)
    garden = CATALOGUE.category_code("garden")
    assert garden is not None
    top = [CATALOGUE.item_ids[i] for i in damped.top_in_category(garden, 3)]
    assert top == ["rake", "gloves", "hose"]
    summed = PopularModel(PopularConfig(damping="none")).train(data, CATALOGUE)
    assert [CATALOGUE.item_ids[i] for i in summed.top_in_category(garden, 1)] == ["gloves"]
    assert [CATALOGUE.item_ids[i] for i in damped.similar(index("hose"), 2)] == ["rake", "gloves"]
    assert damped.contributions(History.of_items([1]), np.array([0])) == {}


# Content --------------------------------------------------------------------------------------


def test_content_similarity_comes_from_category_and_tags() -> None:
    trained = ContentModel().train(matrix_of([]), CATALOGUE)
    kettle = index("kettle-red")
    similarity = trained.similarity(np.arange(len(CATALOGUE)))[kettle]
    assert {CATALOGUE.item_ids[i] for i in trained.similar(kettle, 2)} == {
        "kettle-black",
        "kettle-retro",
    }
    assert similarity[index("toaster")] > similarity[index("rake")] > similarity[index("novel")]
    assert similarity[index("novel")] == 0.0
    scores = trained.score(History.of_items([kettle]))
    assert scores[index("kettle-retro")] > 0  # a new item, reached through content alone
    assert abs(scores[kettle]) < 1e-12  # an item does not recommend itself


# Hybrid ---------------------------------------------------------------------------------------


def test_hybrid_without_history_falls_back_to_popularity() -> None:
    data = matrix_of(synthetic_interactions())
    hybrid = HybridModel().train(data, CATALOGUE)
    popular = PopularModel().train(data, CATALOGUE)
    assert hybrid.route(History.empty()) == "popular"
    np.testing.assert_allclose(hybrid.score(History.empty()), popular.score(History.empty()))


def test_hybrid_blends_content_into_a_thin_history() -> None:
    data = matrix_of(synthetic_interactions())
    hybrid = HybridModel().train(data, CATALOGUE)
    thin = History.of_items([index("kettle-black")])
    assert hybrid.route(thin) == "thin"
    scores = hybrid.score(thin)
    knn = hybrid.components["item_knn"].score(thin)
    assert knn[index("kettle-retro")] == 0.0
    assert scores[index("kettle-retro")] > 0.0  # only content knows the new kettle
    full = History.of_items([index("kettle-black"), index("toaster"), index("mug-red")])
    assert hybrid.route(full) == "full"
    contributions = hybrid.contributions(full, np.array([index("kettle-red")]))
    assert set(contributions) == {"interactions", "content"}
    assert contributions["content"].shape == (1, 3)


# Exact unlearning -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forgetting_a_person_equals_training_without_them(name: str) -> None:
    interactions = synthetic_interactions()
    forgotten = matrix_of(interactions).without_persons(["forget-me"])
    never_seen = matrix_of([i for i in interactions if i.person_id != "forget-me"])
    assert forgotten.persons == never_seen.persons
    assert forgotten.fingerprint() == never_seen.fingerprint()

    model = build_model(name)
    after_forget = model.train(forgotten, CATALOGUE)
    from_scratch = model.train(never_seen, CATALOGUE)
    first, second = after_forget.arrays(), from_scratch.arrays()
    assert first.keys() == second.keys() and first
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert np.array_equal(first[key], second[key]), key
    assert after_forget.report.version == from_scratch.report.version
    assert after_forget.report.persons == from_scratch.report.persons == 18
    for history in (
        History.empty(),
        History.of_items([index("kettle-red")]),
        never_seen.history("p03"),
        History.of_items([index("kettle-red"), index("atlas"), index("hose")]),
    ):
        assert np.array_equal(after_forget.score(history), from_scratch.score(history))
    assert np.array_equal(after_forget.similar(0, 5), from_scratch.similar(0, 5))


@pytest.mark.parametrize("name", ["popular", "item_knn", "ease"])
def test_forgetting_removes_the_persons_influence(name: str) -> None:
    interactions = synthetic_interactions()
    with_them = build_model(name).train(matrix_of(interactions), CATALOGUE)
    without = build_model(name).train(
        matrix_of(interactions).without_persons(["forget-me"]), CATALOGUE
    )
    assert with_them.report.version != without.report.version
    differs = [
        not np.array_equal(with_them.arrays()[key], without.arrays()[key])
        for key in with_them.arrays()
        if with_them.arrays()[key].shape == without.arrays()[key].shape
    ]
    assert any(differs) or with_them.arrays().keys() != without.arrays().keys()


# Choosing a model -----------------------------------------------------------------------------


def test_models_are_built_by_name_with_checked_parameters() -> None:
    knn = build_model("item_knn", {"neighbours": "50", "weighting": "tfidf"})
    assert isinstance(knn, ItemKNNModel)
    assert knn.config.neighbours == 50
    assert knn.config.weighting == "tfidf"
    ease = build_model("ease", {"l2": "250", "binary": "false"})
    assert isinstance(ease, EASEModel)
    assert ease.config.l2 == 250.0 and ease.config.binary is False
    assert build_model().name == "hybrid"
    with pytest.raises(ValueError, match="unknown parameter"):
        build_model("item_knn", {"neighbors": "50"})
    with pytest.raises(ValueError, match="cannot read"):
        build_model("item_knn", {"neighbours": "many"})
    with pytest.raises(ValueError, match="unknown model"):
        build_model("deep_learning")
    with pytest.raises(ValueError):
        build_model("item_knn", {"weighting": "magic"})
