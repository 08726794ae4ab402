"""Recommender models behind one interface (`Model.train` → `TrainedModel.score`).

`build_model(name, parameters)` is how a request or an experiment arm picks one: `popular`,
`item_knn`, `ease`, `content` or `hybrid` (the default), with string parameters such as
`{"neighbours": "50"}` checked against the model's configuration.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.recommend.models.base import (
    FROM_CONTENT,
    FROM_INTERACTIONS,
    Catalogue,
    CatalogueItem,
    History,
    InteractionMatrix,
    Model,
    TrainedModel,
    TrainingReport,
    parse_parameters,
    top_k,
)
from services.recommend.models.content import ContentConfig, ContentModel, content_features
from services.recommend.models.ease import EASEConfig, EASEModel
from services.recommend.models.hybrid import Blend, HybridConfig, HybridModel
from services.recommend.models.item_knn import ItemKNNConfig, ItemKNNModel
from services.recommend.models.popular import PopularConfig, PopularModel

DEFAULT_MODEL = "hybrid"
MODEL_NAMES: tuple[str, ...] = ("popular", "item_knn", "ease", "content", "hybrid")


def build_model(name: str = DEFAULT_MODEL, parameters: Mapping[str, str] | None = None) -> Model:
    """The named model with its configuration; ValueError for an unknown name or parameter.

    Hybrid parameters set its own fields (`thin_history`); its components keep their defaults.
    """
    given = parameters or {}
    if name == "popular":
        return PopularModel(parse_parameters(PopularConfig, given))
    if name == "item_knn":
        return ItemKNNModel(parse_parameters(ItemKNNConfig, given))
    if name == "ease":
        return EASEModel(parse_parameters(EASEConfig, given))
    if name == "content":
        return ContentModel(parse_parameters(ContentConfig, given))
    if name == "hybrid":
        return HybridModel(parse_parameters(HybridConfig, given))
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


__all__ = [
    "DEFAULT_MODEL",
    "FROM_CONTENT",
    "FROM_INTERACTIONS",
    "MODEL_NAMES",
    "Blend",
    "Catalogue",
    "CatalogueItem",
    "ContentConfig",
    "ContentModel",
    "EASEConfig",
    "EASEModel",
    "History",
    "HybridConfig",
    "HybridModel",
    "InteractionMatrix",
    "ItemKNNConfig",
    "ItemKNNModel",
    "Model",
    "PopularConfig",
    "PopularModel",
    "TrainedModel",
    "TrainingReport",
    "build_model",
    "content_features",
    "top_k",
]
