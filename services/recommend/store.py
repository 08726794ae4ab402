"""The recommend service's tables: the catalogue, consented interactions, consent as last heard,
answers shown and the feedback on them, experiments, and forgets waiting for a rebuild.

Recommend keeps only what consent's log sent it for the ``personalisation`` purpose. An
interaction's ``origin_person_id`` is the person it was collected for, so an unmerge can hand it
back. A pending forget holds a person id only until the models are rebuilt without them.
Recommend produces no log, so it has consumer tables but no outbox.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from services.common.consumer import consumer_tables
from services.common.person_links import PersonLinks, person_links_table


class RecommendTable(SQLModel, registry=registry()):
    """Base of the recommend service's tables: their own metadata, apart from other services."""


class ItemRow(RecommendTable, table=True):
    __tablename__ = "recommend_items"
    item_id: str = Field(primary_key=True, max_length=128)
    title: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    category: str = Field(default="", max_length=256)
    tags: list[str] = Field(sa_column=Column(JSON, nullable=False))
    price: float = Field(default=0.0, sa_column=Column(Float, nullable=False, default=0.0))
    available: bool = Field(sa_column=Column(Boolean, nullable=False))
    stub: bool = Field(sa_column=Column(Boolean, nullable=False))
    """Known only from an interaction; unavailable until PutItems describes it."""
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class InteractionRow(RecommendTable, table=True):
    __tablename__ = "recommend_interactions"
    __table_args__ = (Index("ix_recommend_interactions_person", "person_id", "occurred_at"),)
    event_id: str = Field(primary_key=True, max_length=128)
    person_id: str = Field(max_length=40)
    origin_person_id: str = Field(max_length=40, index=True)
    item_id: str = Field(max_length=128)
    event_type: str = Field(max_length=32)
    weight: float = Field(sa_column=Column(Float, nullable=False))
    dwell_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ConsentRow(RecommendTable, table=True):
    """The ``personalisation`` decision as last heard from consent's log."""

    __tablename__ = "recommend_consents"
    person_id: str = Field(primary_key=True, max_length=40)
    allowed: bool = Field(sa_column=Column(Boolean, nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    ledger_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class ImpressionRow(RecommendTable, table=True):
    __tablename__ = "recommend_impressions"
    __table_args__ = (Index("ix_recommend_impressions_person", "person_id", "shown_at"),)
    impression_id: str = Field(primary_key=True, max_length=40)
    person_id: str = Field(default="", max_length=40)
    experiment_id: str = Field(default="", max_length=128)
    arm: str = Field(default="", max_length=128)
    model: str = Field(max_length=64)
    model_version: str = Field(max_length=128)
    item_ids: list[str] = Field(sa_column=Column(JSON, nullable=False))
    shown_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class FeedbackRow(RecommendTable, table=True):
    __tablename__ = "recommend_feedback"
    __table_args__ = (Index("ix_recommend_feedback_arm", "experiment_id", "arm"),)
    feedback_id: str = Field(primary_key=True, max_length=40)
    impression_id: str = Field(max_length=40, index=True)
    item_id: str = Field(max_length=128)
    type: str = Field(max_length=16)
    experiment_id: str = Field(default="", max_length=128)
    arm: str = Field(default="", max_length=128)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ExperimentRow(RecommendTable, table=True):
    __tablename__ = "recommend_experiments"
    experiment_id: str = Field(primary_key=True, max_length=128)
    salt: str = Field(max_length=128)
    arms: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    active: bool = Field(sa_column=Column(Boolean, nullable=False))
    updated_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ForgetRow(RecommendTable, table=True):
    """A rebuild the models owe: someone's interactions are gone, their influence is not yet.

    Keyed by a random id, not the person's: an erased person must leave no row behind, and
    what the rebuild needs is only that it is owed, and since when.
    """

    __tablename__ = "recommend_forgets"
    forget_id: str = Field(primary_key=True, max_length=32)
    requested_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    due_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


target_metadata = RecommendTable.metadata
CONSUMER_TABLES: Final = consumer_tables(target_metadata, prefix="recommend_")
PERSON_LINKS: Final = PersonLinks(person_links_table(target_metadata, prefix="recommend_"))
"""Persons identity merged, so an unmerge hands back every interaction it should (see
services/common/person_links.py)."""

items_table = ItemRow.__table__  # type: ignore[attr-defined]
interactions_table = InteractionRow.__table__  # type: ignore[attr-defined]
consents_table = ConsentRow.__table__  # type: ignore[attr-defined]
impressions_table = ImpressionRow.__table__  # type: ignore[attr-defined]
feedback_table = FeedbackRow.__table__  # type: ignore[attr-defined]
experiments_table = ExperimentRow.__table__  # type: ignore[attr-defined]
forgets_table = ForgetRow.__table__  # type: ignore[attr-defined]
