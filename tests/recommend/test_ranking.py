"""Serving: filters, the stated need (BM25), diversity (MMR + category cap) and reasons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from services.recommend.interactions import Interaction, build_interaction_matrix
from services.recommend.matching import NeedMatcher, stem, tokenize
from services.recommend.models import (
    Catalogue,
    CatalogueItem,
    History,
    ItemKNNConfig,
    ItemKNNModel,
    PopularModel,
    TrainingReport,
    top_k,
)
from services.recommend.ranking import (
    Filters,
    PoolSimilarity,
    Ranker,
    ReasonKind,
    allowed_items,
    category_cap,
    mmr_select,
)

NOW = 1_000_000.0

CATALOGUE = Catalogue(
    [
        CatalogueItem("kettle-red", "Red kettle", "kitchen", ("red", "kettle"), 30.0),
        CatalogueItem("kettle-black", "Black kettle", "kitchen", ("black", "kettle"), 35.0),
        CatalogueItem("kettle-retro", "Retro kettle", "kitchen", ("retro", "kettle"), 45.0, False),
        CatalogueItem("mug-red", "Red mug", "kitchen", ("red", "mug"), 8.0),
        CatalogueItem("rake", "Garden rake", "garden", ("rake",), 20.0),
        CatalogueItem("hose", "Garden hose", "garden", ("hose",), 25.0),
        CatalogueItem("novel", "A novel", "books", ("fiction",), 12.0),
        CatalogueItem("atlas", "World atlas", "books", ("maps",), 25.0),
        CatalogueItem("mystery", "Mystery box", "", (), 5.0),
    ]
)


def ids(indices: Any) -> list[str]:
    return [CATALOGUE.item_ids[int(i)] for i in indices]


def index(item_id: str) -> int:
    return CATALOGUE.index(item_id)


@dataclass
class FixedScores:
    """A model whose scores are given, to test ranking on its own."""

    scores: npt.NDArray[np.float64]
    name: str = "fixed"
    report: TrainingReport = field(
        default_factory=lambda: TrainingReport("fixed", "fixed-1", 0, 0, 0, 0.0, 0)
    )

    def score(self, history: History) -> npt.NDArray[np.float64]:
        return self.scores.copy()

    def contributions(
        self, history: History, items: npt.NDArray[np.int64]
    ) -> dict[str, npt.NDArray[np.float64]]:
        return {}

    def similar(self, item: int, k: int) -> npt.NDArray[np.int64]:
        return np.zeros(0, dtype=np.int64)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"scores": self.scores}


def by_name(**scores: float) -> FixedScores:
    values = np.zeros(len(CATALOGUE))
    for item_id, value in scores.items():
        values[index(item_id.replace("_", "-"))] = value
    return FixedScores(values)


RELEVANCE = by_name(
    kettle_red=0.9,
    kettle_black=0.8,
    kettle_retro=0.7,
    mug_red=0.6,
    rake=0.5,
    hose=0.4,
    novel=0.3,
    atlas=0.2,
    mystery=0.1,
)
RANKER = Ranker(CATALOGUE)


# Filters --------------------------------------------------------------------------------------


def test_filters_restrict_categories_prices_exclusions_and_availability() -> None:
    answer = RANKER.recommend(
        RELEVANCE,
        History.empty(),
        k=10,
        filters=Filters(
            categories=("kitchen", "garden"),
            min_price=10.0,
            max_price=40.0,
            exclude_item_ids=("kettle-black",),
            available_only=True,
        ),
    )
    assert [item.item_id for item in answer] == ["kettle-red", "rake", "hose"]
    assert RANKER.recommend(RELEVANCE, History.empty(), filters=Filters(categories=("toys",))) == []


def test_items_already_bought_are_excluded_unless_asked_for() -> None:
    bought = np.array([index("kettle-red")])
    default = RANKER.recommend(RELEVANCE, History.empty(), k=2, purchased=bought)
    assert [item.item_id for item in default] == ["kettle-black", "kettle-retro"]
    included = RANKER.recommend(
        RELEVANCE,
        History.empty(),
        k=2,
        purchased=bought,
        filters=Filters(include_purchased=True),
    )
    assert [item.item_id for item in included] == ["kettle-red", "kettle-black"]
    mask = allowed_items(CATALOGUE, Filters(), purchased=bought, exclude=np.array([0, 1]))
    assert not mask[[0, 1, index("kettle-red")]].any() and mask.sum() == len(CATALOGUE) - 3


# Diversity ------------------------------------------------------------------------------------


def test_diversity_zero_is_the_pure_relevance_order() -> None:
    answer = RANKER.recommend(RELEVANCE, History.empty(), k=9, diversity=0.0)
    assert [item.item_id for item in answer] == list(
        ids(np.argsort(-RELEVANCE.scores, kind="stable"))
    )
    assert [item.score for item in answer] == sorted((item.score for item in answer), reverse=True)
    ties = FixedScores(np.ones(len(CATALOGUE)))
    assert [item.index for item in RANKER.recommend(ties, History.empty(), k=3)] == [0, 1, 2]


def test_full_diversity_never_repeats_a_category_while_others_qualify() -> None:
    answer = RANKER.recommend(RELEVANCE, History.empty(), k=6, diversity=1.0)
    categories = [item.category for item in answer]
    assert categories[:4] == ["kitchen", "garden", "books", ""]
    assert answer[0].item_id == "kettle-red"  # the best of each category, best first
    assert len(answer) == 6  # once every category is in, the cap gives way
    only_two = RANKER.recommend(
        RELEVANCE,
        History.empty(),
        k=4,
        diversity=1.0,
        filters=Filters(categories=("garden", "books")),
    )
    assert [item.category for item in only_two][:2] == ["garden", "books"]
    assert len(only_two) == 4


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(
        st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=9, max_size=9
    ),
    k=st.integers(min_value=1, max_value=9),
    excluded=st.sets(st.integers(min_value=0, max_value=8), max_size=5),
)
def test_full_diversity_invariant_holds_for_any_scores(
    scores: list[float], k: int, excluded: set[int]
) -> None:
    model = FixedScores(np.array(scores))
    filters = Filters(exclude_item_ids=tuple(CATALOGUE.item_ids[i] for i in excluded))
    answer = RANKER.recommend(model, History.empty(), k=k, diversity=1.0, filters=filters)
    qualifying = {CATALOGUE.items[i].category for i in range(9) if i not in excluded}
    assert len(answer) == min(k, 9 - len(excluded))
    seen: set[str] = set()
    for item in answer:
        if item.category in seen:
            assert seen == qualifying, "a category repeated while another still qualified"
        seen.add(item.category)


def test_mmr_trades_relevance_for_dissimilarity() -> None:
    relevance = np.array([1.0, 0.95, 0.9])
    similarity = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    categories = np.array([0, 1, 2])
    pure = mmr_select(relevance, similarity, categories, 3, trade_off=1.0, cap=3)
    assert pure.tolist() == [0, 1, 2]
    diverse = mmr_select(relevance, similarity, categories, 3, trade_off=0.5, cap=3)
    assert diverse.tolist() == [0, 2, 1]
    capped = mmr_select(relevance, similarity, np.array([0, 0, 1]), 3, trade_off=1.0, cap=1)
    assert capped.tolist() == [0, 2, 1]


def test_pool_similarity_rows_are_the_sparse_products_bits() -> None:
    pool = np.array([8, 0, 3, 1, 5, 6], dtype=np.int64)
    rows = RANKER.features[pool]
    product = np.asarray((rows @ rows.T).toarray(), dtype=np.float64)
    similarity = PoolSimilarity(RANKER.features, pool)
    for pick in range(pool.size):
        assert similarity[pick].tobytes() == product[pick].tobytes()


def test_category_cap_shrinks_with_diversity() -> None:
    assert category_cap(10, 0.0) == 10
    assert category_cap(10, 0.5) == 5
    assert category_cap(10, 0.95) == 1
    assert category_cap(10, 1.0) == 1
    assert category_cap(3, 0.5) == math.ceil(1.5)


# Explanations ---------------------------------------------------------------------------------


def trained_knn() -> ItemKNNModel:
    return ItemKNNModel(ItemKNNConfig(neighbours=5))


def knn_data() -> list[Interaction]:
    baskets = [
        ("kettle-red", "mug-red"),
        ("kettle-red", "mug-red", "kettle-black"),
        ("rake", "hose"),
        ("rake", "hose", "novel"),
        ("novel", "atlas"),
        ("kettle-black", "mug-red"),
    ]
    return [
        Interaction(f"p{n}", item, 1.0, NOW) for n, basket in enumerate(baskets) for item in basket
    ]


def test_reasons_name_the_items_of_the_persons_own_history() -> None:
    data = build_interaction_matrix(knn_data(), CATALOGUE, now=NOW)
    model = trained_knn().train(data, CATALOGUE)
    history = History(
        np.array([index("kettle-red"), index("rake")]), np.array([1.0, 1.0]), ("viewed", "bought")
    )
    answer = RANKER.recommend(model, history, k=3, exclude=history.indices)
    assert answer
    for item in answer:
        assert item.reason.kind is ReasonKind.BECAUSE_YOU_INTERACTED
        assert set(item.reason.contributing_item_ids) <= {"kettle-red", "rake"}
        assert item.reason.contributing_item_ids
    mug = next(item for item in answer if item.item_id == "mug-red")
    assert mug.reason.contributing_item_ids == ("kettle-red",)
    assert mug.reason.text == "because you viewed Red kettle"
    hose = next(item for item in answer if item.item_id == "hose")
    assert hose.reason.text == "because you bought Garden rake"


def test_reason_lists_two_contributors_with_their_verbs() -> None:
    data = build_interaction_matrix(knn_data(), CATALOGUE, now=NOW)
    model = trained_knn().train(data, CATALOGUE)
    history = History(
        np.array([index("kettle-red"), index("kettle-black")]),
        np.array([1.0, 2.0]),
        ("viewed", "bought"),
    )
    mug = RANKER.recommend(model, history, k=1, exclude=history.indices)[0]
    assert mug.item_id == "mug-red"
    assert mug.reason.contributing_item_ids == ("kettle-black", "kettle-red")
    assert mug.reason.text == "because you bought Black kettle and viewed Red kettle"


def test_without_history_the_reason_is_popularity_in_the_category() -> None:
    data = build_interaction_matrix(knn_data(), CATALOGUE, now=NOW)
    popular = PopularModel().train(data, CATALOGUE)
    answer = RANKER.recommend(popular, History.empty(), k=9)
    first = answer[0]
    assert first.reason.kind is ReasonKind.POPULAR_IN_CATEGORY
    assert first.reason.text == f"popular in {first.category}"
    assert first.reason.category == first.category
    mystery = next(item for item in answer if item.item_id == "mystery")
    assert mystery.reason.kind is ReasonKind.POPULAR


# The stated need ------------------------------------------------------------------------------


def test_tokenizer_folds_case_plurals_and_stop_words() -> None:
    assert tokenize("I want RED kettles for the Kitchen_Boxes") == [
        "red",
        "kettle",
        "kitchen",
        "box",
    ]
    assert [stem(word) for word in ("candies", "glass", "christmas", "mugs")] == [
        "candy",
        "glass",
        "christmas",
        "mug",
    ]


def test_bm25_scores_follow_the_formula() -> None:
    catalogue = Catalogue(
        [
            CatalogueItem("a", "red kettle"),
            CatalogueItem("b", "red red mug cup"),
            CatalogueItem("c", "garden hose"),
        ]
    )
    matcher = NeedMatcher(catalogue, k1=1.2, b=0.75)
    lengths = np.array([2.0, 4.0, 2.0])
    average = float(lengths.mean())

    def bm25(tf: float, df: int, length: float) -> float:
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * length / average))

    scores = matcher.score("red kettles")
    np.testing.assert_allclose(
        scores,
        [bm25(1, 2, 2) + bm25(1, 1, 2), bm25(2, 2, 4), 0.0],
    )
    assert matcher.matched_terms("red kettles", 1) == ["red"]
    assert not matcher.score("bicycle").any()


def test_a_stated_need_ranks_matching_items_first_and_says_so() -> None:
    answer = RANKER.recommend(RELEVANCE, History.empty(), k=3, need="a retro kettle please")
    assert answer[0].item_id == "kettle-retro"
    assert answer[0].reason.kind is ReasonKind.MATCHES_NEED
    assert "“retro”" in answer[0].reason.text
    assert {item.item_id for item in answer[1:]} == {"kettle-red", "kettle-black"}
    unmatched = RANKER.recommend(RELEVANCE, History.empty(), k=3, need="bicycle")
    assert [item.item_id for item in unmatched] == ["kettle-red", "kettle-black", "kettle-retro"]
    garden = RANKER.recommend(RELEVANCE, History.empty(), k=2, need="garden")
    assert [item.item_id for item in garden] == ["rake", "hose"]


@settings(max_examples=200, deadline=None)
@given(
    levels=st.integers(min_value=1, max_value=50),
    size=st.sampled_from([9, 1_300, 5_000]),
    k=st.integers(min_value=1, max_value=40),
    excluded_share=st.sampled_from([0.0, 0.5, 0.97, 1.0]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_top_k_is_the_best_k_by_score_then_index_whatever_the_ties(
    levels: int, size: int, k: int, excluded_share: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size).astype(np.float64) / levels
    scores[rng.random(size) < excluded_share] = -np.inf
    competing = [index for index in range(size) if scores[index] > -np.inf]
    expected = sorted(competing, key=lambda index: (-scores[index], index))[:k]
    assert top_k(scores, k).tolist() == expected
