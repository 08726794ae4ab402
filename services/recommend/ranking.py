"""From a model's scores to an answer: filters, the stated need, diversity and reasons.

1. Relevance: the model's scores for the history (scaled to a maximum of 1). With a stated need,
   BM25 scores are blended in and items matching the need rank above those that do not.
2. Filters: categories, price range, excluded ids, availability, and items already bought
   (unless the request includes them).
3. Diversity d ∈ [0, 1]: d = 0 is the relevance order. Above 0, maximal marginal relevance
   (Carbonell & Goldstein 1998) trades relevance against content similarity (category and
   tags) to what is already chosen,
   with trade-off λ = 1 - d·`mmr_weight`, and at most ⌈k·(1 - d)⌉ items per category (at least
   one). The cap gives way only when no other category has a qualifying item left, so d = 1
   never returns two items of one category while others qualify.
4. A reason per item: the history items that contributed most ("because you viewed X, Y"), the
   need's matched words, or popularity in the item's category.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from services.recommend.matching import NeedMatcher
from services.recommend.models.base import (
    FROM_CONTENT,
    FROM_INTERACTIONS,
    Catalogue,
    CatalogueItem,
    FloatArray,
    History,
    IntArray,
    TrainedModel,
    csr_entries,
    top_k,
)
from services.recommend.models.content import content_features

BoolArray = npt.NDArray[np.bool_]

_CACHED_MASKS = 256
"""Filter combinations whose masks (0 or -inf per item) a ranker keeps."""


@dataclass(frozen=True)
class Filters:
    """Restrictions on what may be recommended (mirrors `RecommendFilters`)."""

    categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    exclude_item_ids: tuple[str, ...] = ()
    available_only: bool = False
    include_purchased: bool = False


class ReasonKind(StrEnum):
    """Why an item was recommended (mirrors `steward.recommend.v1.ReasonKind`)."""

    BECAUSE_YOU_INTERACTED = "because_you_interacted"
    POPULAR = "popular"
    POPULAR_IN_CATEGORY = "popular_in_category"
    MATCHES_NEED = "matches_need"
    SIMILAR_CONTENT = "similar_content"


@dataclass(frozen=True)
class Reason:
    kind: ReasonKind
    text: str
    contributing_item_ids: tuple[str, ...] = ()
    category: str = ""


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    index: int
    score: float
    title: str
    category: str
    reason: Reason


def allowed_items(
    catalogue: Catalogue,
    filters: Filters,
    purchased: IntArray | None = None,
    exclude: IntArray | None = None,
) -> BoolArray:
    """Which items pass the filters; bought items are out unless `include_purchased`."""
    allowed = np.ones(len(catalogue), dtype=np.bool_)
    if filters.categories:
        codes = [catalogue.category_code(category) for category in filters.categories]
        known = np.array([code for code in codes if code is not None], dtype=np.int64)
        allowed &= np.isin(catalogue.category_codes, known)
    if filters.min_price is not None:
        allowed &= catalogue.prices >= filters.min_price
    if filters.max_price is not None:
        allowed &= catalogue.prices <= filters.max_price
    if filters.available_only:
        allowed &= catalogue.available
    if filters.exclude_item_ids:
        allowed[catalogue.indices(filters.exclude_item_ids)] = False
    if purchased is not None and not filters.include_purchased:
        allowed[purchased] = False
    if exclude is not None:
        allowed[exclude] = False
    return allowed


def category_cap(k: int, diversity: float) -> int:
    """Items allowed per category: k at diversity 0, one at diversity 1."""
    if diversity <= 0:
        return k
    return max(1, math.ceil(k * (1.0 - diversity) - 1e-9))


class SimilarityRows(Protocol):
    """Row `pick` of a pool's similarity matrix (a dense matrix is one)."""

    def __getitem__(self, pick: int, /) -> Any: ...


class PoolSimilarity:
    """The content similarity of a pool's items to one of them, made row by row.

    MMR reads only the rows of the k items it picks, so the pool x pool product is never made.
    Each row sums the products over the picked item's features in column order, as the sparse
    product F·Fᵀ does, so its values are the same bits.
    """

    def __init__(self, features: Any, pool: IntArray) -> None:
        positions, columns, values = csr_entries(features, pool)
        self._used, local = np.unique(columns, return_inverse=True)
        # One contiguous row per feature the pool has: the pool's values of that feature.
        self._by_feature = np.zeros((self._used.size, pool.size), dtype=np.float64)
        self._by_feature[local, positions] = values
        self._features, self._pool = features, pool

    def __getitem__(self, pick: int) -> FloatArray:
        features = self._features
        item = int(self._pool[pick])
        start, end = int(features.indptr[item]), int(features.indptr[item + 1])
        local = np.searchsorted(self._used, features.indices[start:end]).tolist()
        row = np.zeros(self._pool.size, dtype=np.float64)
        for feature, value in zip(local, features.data[start:end].tolist(), strict=True):
            row += self._by_feature[feature] * value
        return row


def mmr_select(
    relevance: FloatArray,
    similarity: FloatArray | SimilarityRows,
    categories: IntArray,
    k: int,
    *,
    trade_off: float,
    cap: int,
) -> IntArray:
    """Greedy MMR over a pool ordered best-first, with a per-category cap.

    `relevance` is scaled to [0, 1] over the pool; among equal MMR values the earlier (more
    relevant) pool entry wins. When no entry satisfies the cap, the cap rises by one.
    """
    size = relevance.shape[0]
    chosen: list[int] = []
    taken = np.zeros(size, dtype=np.bool_)
    closest = np.zeros(size, dtype=np.float64)
    _, codes = np.unique(categories, return_inverse=True)
    per_category = np.zeros(int(codes.max()) + 1 if size else 0, dtype=np.int64)
    while len(chosen) < min(k, size):
        eligible = ~taken & (per_category[codes] < cap)
        if not eligible.any():
            cap += 1
            continue
        value = trade_off * relevance - (1.0 - trade_off) * closest
        value[~eligible] = -np.inf
        pick = int(np.argmax(value))
        chosen.append(pick)
        taken[pick] = True
        per_category[codes[pick]] += 1
        np.maximum(closest, similarity[pick], out=closest)
    return np.array(chosen, dtype=np.int64)


class Ranker:
    """Turns a trained model's scores into the answer for one catalogue.

    `need_share` is the weight of the need's BM25 score against the personal score;
    `mmr_weight` the similarity penalty at full diversity; `pool` how many of the most relevant
    items MMR considers (plus the best item of every category).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        need_share: float = 0.7,
        mmr_weight: float = 0.5,
        pool: int = 100,
        explained_items: int = 2,
    ) -> None:
        self.catalogue = catalogue
        self.features = content_features(catalogue)
        codes = catalogue.category_codes
        self._by_category = np.argsort(codes, kind="stable")
        self._category_of_position = codes[self._by_category]
        self._category_sizes = np.bincount(codes, minlength=len(catalogue.categories))
        present = self._category_sizes > 0
        self._category_sizes = self._category_sizes[present]
        self._category_starts = np.r_[0, np.cumsum(self._category_sizes)[:-1]].astype(np.int64)
        self.matcher = NeedMatcher(catalogue)
        self.need_share = need_share
        self.mmr_weight = mmr_weight
        self.pool = pool
        self.explained_items = explained_items
        self._masks: dict[tuple[object, ...], FloatArray] = {}

    def relevance(
        self,
        model: TrainedModel,
        history: History,
        need: str = "",
        *,
        terms: list[str] | None = None,
    ) -> FloatArray:
        """Personal scores scaled to a maximum of 1, blended with the need; matches rank first.

        `terms` are the need's (`NeedMatcher.terms`) when the caller has them already."""
        personal = model.score(history)
        top = float(personal.max()) if personal.size else 0.0
        if top > 0:
            personal = personal / top
        if not need:
            return personal
        matched = self.matcher.score(need, terms)
        best = float(matched.max()) if matched.size else 0.0
        if best <= 0:
            return personal
        blended = (1.0 - self.need_share) * personal + self.need_share * matched / best
        return np.asarray(blended + (matched > 0), dtype=np.float64)

    def recommend(
        self,
        model: TrainedModel,
        history: History,
        *,
        k: int = 10,
        filters: Filters = Filters(),
        diversity: float = 0.0,
        need: str = "",
        purchased: IntArray | None = None,
        exclude: IntArray | None = None,
    ) -> list[Recommendation]:
        """The k best allowed items, diversified and explained."""
        if not 0.0 <= diversity <= 1.0:
            raise ValueError("diversity must be between 0 and 1")
        terms = self.matcher.terms(need) if need else []
        relevance = self.relevance(model, history, need, terms=terms)
        # Relevance is finite, so adding 0 keeps an allowed item's and -inf removes the others.
        scores = self._barred(filters, purchased, exclude)
        scores += relevance
        chosen = top_k(scores, k) if diversity <= 0 else self._diversify(scores, k, diversity)
        return self._explain(model, history, chosen, scores, terms)

    def _barred(
        self, filters: Filters, purchased: IntArray | None, exclude: IntArray | None
    ) -> FloatArray:
        """0 for the items `allowed_items` lets through, -inf for the others; the catalogue
        filters' part (categories, prices, availability) kept per filter combination, as a shop
        asks the same few again and again."""
        key = (filters.categories, filters.min_price, filters.max_price, filters.available_only)
        base = self._masks.get(key)
        if base is None:
            allowed = allowed_items(self.catalogue, Filters(*key[:3], available_only=key[3]))
            base = np.where(allowed, 0.0, -np.inf)
            if len(self._masks) >= _CACHED_MASKS:
                self._masks.clear()
            self._masks[key] = base
        barred = base.copy()
        if filters.exclude_item_ids:
            barred[self.catalogue.indices(filters.exclude_item_ids)] = -np.inf
        if purchased is not None and not filters.include_purchased:
            barred[purchased] = -np.inf
        if exclude is not None:
            barred[exclude] = -np.inf
        return barred

    def _diversify(self, scores: FloatArray, k: int, diversity: float) -> IntArray:
        if not bool((scores > -np.inf).any()):
            return np.zeros(0, dtype=np.int64)
        leading = top_k(scores, max(self.pool, k))
        pool = np.union1d(leading, self._best_per_category(scores)).astype(np.int64)
        pool = pool[np.lexsort((pool, -scores[pool]))]
        values = scores[pool]
        low, high = float(values.min()), float(values.max())
        relevance = (values - low) / (high - low) if high > low else np.ones_like(values)
        selected = mmr_select(
            relevance,
            PoolSimilarity(self.features, pool),
            self.catalogue.category_codes[pool],
            k,
            trade_off=1.0 - diversity * self.mmr_weight,
            cap=category_cap(k, diversity),
        )
        return np.asarray(pool[selected], dtype=np.int64)

    def _best_per_category(self, scores: FloatArray) -> IntArray:
        """The best allowed item of every category (the lowest index among equals), in O(n)."""
        ordered = scores[self._by_category]
        best = np.maximum.reduceat(ordered, self._category_starts)
        winners = np.flatnonzero(
            (ordered == np.repeat(best, self._category_sizes)) & (ordered > -np.inf)
        )
        _, first = np.unique(self._category_of_position[winners], return_index=True)
        return np.asarray(self._by_category[winners[first]], dtype=np.int64)

    def _explain(
        self,
        model: TrainedModel,
        history: History,
        chosen: IntArray,
        scores: FloatArray,
        need_terms: list[str],
    ) -> list[Recommendation]:
        """`need_terms` are the need's terms found in the catalogue."""
        by_source = model.contributions(history, chosen) if len(history) and chosen.size else {}
        interactions = by_source.get(FROM_INTERACTIONS)
        content = by_source.get(FROM_CONTENT)
        if interactions is None and content is None:
            leaders: list[list[int]] = [[] for _ in range(chosen.size)]
            content_led = [False] * chosen.size
        else:
            if interactions is None:
                interactions = np.zeros_like(content)
            if content is None:
                content = np.zeros_like(interactions)
            leaders = self._contributors(interactions + content)
            content_led = (content.sum(axis=1) > interactions.sum(axis=1)).tolist()
        items = self.catalogue.items
        indices = chosen.tolist()
        matches = (
            self.matcher.matched_terms_of(need_terms, indices)
            if need_terms
            else [[] for _ in indices]
        )
        told = [items[index] for index in history.indices.tolist()]
        # Answers often share their leading history items: one reason each, made once.
        reasons: dict[tuple[object, ...], Reason] = {}
        answer = []
        for row, (index, score) in enumerate(zip(indices, scores[chosen].tolist(), strict=True)):
            item = items[index]
            matched = matches[row]
            leading = leaders[row]
            key = (
                tuple(leading),
                content_led[row],
                tuple(matched),
                "" if leading or matched else item.category,
            )
            reason = reasons.get(key)
            if reason is None:
                reason = reasons[key] = self._reason(
                    item.category, history, told, leading, matched, content_led=content_led[row]
                )
            answer.append(
                Recommendation(
                    item_id=item.item_id,
                    index=index,
                    score=score,
                    title=item.title,
                    category=item.category,
                    reason=reason,
                )
            )
        return answer

    def _contributors(self, contributions: FloatArray) -> list[list[int]]:
        """Per answer row, the history positions that added most (positive only; the earlier
        position among equals)."""
        if contributions.size == 0:
            return [[] for _ in range(contributions.shape[0])]
        order = np.argsort(-contributions, axis=1, kind="stable")[:, : self.explained_items]
        rows = np.arange(contributions.shape[0])[:, None]
        leading = contributions[rows, order] > 0
        return [
            [p for p, positive in zip(row, keep, strict=True) if positive]
            for row, keep in zip(order.tolist(), leading.tolist(), strict=True)
        ]

    def _reason(
        self,
        category: str,
        history: History,
        told: Sequence[CatalogueItem],
        contributors: list[int],
        matched: list[str],
        *,
        content_led: bool,
    ) -> Reason:
        """`told` holds the catalogue item of each history position."""
        ids = tuple(told[p].item_id for p in contributors)
        if matched:
            text = "matches " + ", ".join(f"“{term}”" for term in matched)
            if contributors:
                text += "; " + self._because(history, told, contributors)
            return Reason(ReasonKind.MATCHES_NEED, text, ids)
        if contributors:
            if content_led:
                names = ", ".join(_name(told[p]) for p in contributors)
                return Reason(ReasonKind.SIMILAR_CONTENT, f"similar to {names}", ids)
            return Reason(
                ReasonKind.BECAUSE_YOU_INTERACTED, self._because(history, told, contributors), ids
            )
        if category:
            return Reason(
                ReasonKind.POPULAR_IN_CATEGORY, f"popular in {category}", category=category
            )
        return Reason(ReasonKind.POPULAR, "popular right now")

    def _because(
        self, history: History, told: Sequence[CatalogueItem], contributors: list[int]
    ) -> str:
        """ "because you viewed X, Y" — or "bought X and viewed Y" when the verbs differ."""
        groups: dict[str, list[str]] = {}
        for position in contributors:
            groups.setdefault(history.verb(position), []).append(_name(told[position]))
        phrases = []
        for verb, names in groups.items():
            if verb == "added to cart":
                phrases.append(f"added {', '.join(names)} to your cart")
            else:
                phrases.append(f"{verb} {', '.join(names)}")
        return "because you " + " and ".join(phrases)


def _name(item: CatalogueItem) -> str:
    return item.title or item.item_id
