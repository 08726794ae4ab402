"""A stated need ("a red kettle for a small kitchen") matched lexically against the catalogue.

Okapi BM25 (Robertson et al.) over one document per item: its title, category and tags, with
the category and tags counted more than the title (`field_weights`), as in BM25F. The item x
term weights are computed once per catalogue, so a need costs a few sparse column sums. The need
itself is never stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from services.recommend.models.base import Catalogue, FloatArray

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOPWORDS_TEXT = (
    "a an and are as at be for from i in is it me my of on or our some that the this to "
    "want we with you your need looking"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
# Words whose final s is not a plural.
_NOT_PLURAL = frozenset(("christmas", "xmas", "canvas", "gas", "atlas", "lens", "news", "series"))


def stem(word: str) -> str:
    """A light plural stemmer: kettles → kettle, boxes → box, candies → candy."""
    if word in _NOT_PLURAL:
        return word
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased, stemmed words without stop words; underscores separate words."""
    return [stem(word) for word in _WORD.findall(text.casefold()) if word not in STOPWORDS]


@dataclass(frozen=True)
class FieldWeights:
    title: float = 1.0
    category: float = 2.0
    tags: float = 1.5


class NeedMatcher:
    """BM25 scores of every catalogue item for a free-text need."""

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        k1: float = 1.2,
        b: float = 0.75,
        field_weights: FieldWeights = FieldWeights(),
    ) -> None:
        documents: list[dict[str, float]] = []
        for item in catalogue.items:
            counts: dict[str, float] = {}
            for weight, text in (
                (field_weights.title, item.title),
                (field_weights.category, item.category),
                (field_weights.tags, " ".join(item.tags)),
            ):
                for token in tokenize(text):
                    counts[token] = counts.get(token, 0.0) + weight
            documents.append(counts)
        terms = sorted({term for document in documents for term in document})
        self.vocabulary = {term: column for column, term in enumerate(terms)}
        rows = np.repeat(np.arange(len(documents)), [len(document) for document in documents])
        columns = np.array(
            [self.vocabulary[term] for document in documents for term in sorted(document)],
            dtype=np.int64,
        )
        frequencies = np.array(
            [document[term] for document in documents for term in sorted(document)],
            dtype=np.float64,
        )
        n_items = len(documents)
        lengths = np.array([sum(document.values()) for document in documents], dtype=np.float64)
        average = float(lengths.mean()) if n_items and lengths.mean() > 0 else 1.0
        document_frequency = np.bincount(columns, minlength=len(terms)).astype(np.float64)
        idf = np.log(1.0 + (n_items - document_frequency + 0.5) / (document_frequency + 0.5))
        norm = k1 * (1.0 - b + b * lengths[rows] / average)
        values = idf[columns] * frequencies * (k1 + 1.0) / (frequencies + norm)
        self._weights: Any = sparse.csc_matrix(
            (values, (rows, columns)), shape=(n_items, max(len(terms), 1))
        )
        # Canonical (each column's rows sorted, once each): `matched_terms_of` searches them.
        self._weights.sum_duplicates()
        self._n_items = n_items

    def terms(self, need: str) -> list[str]:
        """The need's terms that occur in the catalogue, in first-seen order."""
        seen: dict[str, None] = {}
        for token in tokenize(need):
            if token in self.vocabulary:
                seen.setdefault(token, None)
        return list(seen)

    def score(self, need: str, terms: list[str] | None = None) -> FloatArray:
        """BM25 of every item for the need (0 for items sharing no term with it); `terms` are the
        need's `terms` when the caller already has them.

        Summed from the terms' CSC columns directly: scipy's column indexing builds and validates
        a new matrix, which costs more than the few hundred entries a need reads.
        """
        columns = [self.vocabulary[term] for term in (self.terms(need) if terms is None else terms)]
        scores = np.zeros(self._n_items, dtype=np.float64)
        indptr, rows, values = self._weights.indptr, self._weights.indices, self._weights.data
        # Column by column, in the order given: the additions of the sparse column sum.
        for column in columns:
            start, end = indptr[column], indptr[column + 1]
            scores[rows[start:end]] += values[start:end]
        return scores

    def matched_terms(self, need: str, item: int) -> list[str]:
        """The need's terms found in one item (for the explanation)."""
        return self.matched_terms_of(self.terms(need), [item])[0]

    def matched_terms_of(self, terms: list[str], items: list[int]) -> list[list[str]]:
        """Of the need's `terms`, those found in each of `items`: one search of each term's
        sorted CSC column for all the items at once."""
        matched: list[list[str]] = [[] for _ in items]
        if not items:
            return matched
        wanted = np.array(items, dtype=np.int64)
        indptr, rows, values = self._weights.indptr, self._weights.indices, self._weights.data
        for term in terms:
            column = self.vocabulary[term]
            start, end = int(indptr[column]), int(indptr[column + 1])
            if start == end:
                continue
            slot = np.minimum(np.searchsorted(rows[start:end], wanted), end - start - 1) + start
            found = (rows[slot] == wanted) & (values[slot] > 0)
            for position in np.flatnonzero(found).tolist():
                matched[position].append(term)
        return matched
