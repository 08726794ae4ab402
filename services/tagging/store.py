"""The tagging service's tables: minimised events kept for profiling, consent as last heard,
profiles, tags with their explanations, suppressions, objections and rule sets.

Tagging keeps only what consent's log sent it for the ``profiling`` purpose; an event's
``origin_person_id`` is the person it was collected for, so an unmerge can hand events back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from services.common.consumer import consumer_tables
from services.common.outbox import outbox_tables
from services.common.person_links import PersonLinks, person_links_table

PRODUCER: Final = "tagging"


class TaggingTable(SQLModel, registry=registry()):
    """Base of the tagging service's tables: their own metadata, apart from other services."""


class EventRow(TaggingTable, table=True):
    __tablename__ = "tagging_events"
    __table_args__ = (Index("ix_tagging_events_person", "person_id", "occurred_at"),)
    event_id: str = Field(primary_key=True, max_length=128)
    person_id: str = Field(max_length=40)
    origin_person_id: str = Field(max_length=40, index=True)
    type: int
    item_id: str = Field(default="", max_length=128)
    category: str = Field(default="", max_length=256)
    value: float = Field(default=0.0, sa_column=Column(Float, nullable=False, default=0.0))
    dwell_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    quantity: int = 0
    channel: str = Field(default="", max_length=32)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ConsentRow(TaggingTable, table=True):
    __tablename__ = "tagging_consents"
    person_id: str = Field(primary_key=True, max_length=40)
    purpose: str = Field(primary_key=True, max_length=64)
    allowed: bool = Field(sa_column=Column(Boolean, nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    ledger_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class ProfileRow(TaggingTable, table=True):
    __tablename__ = "tagging_profiles"
    person_id: str = Field(primary_key=True, max_length=40)
    profile: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    computed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class TagRow(TaggingTable, table=True):
    __tablename__ = "tagging_tags"
    __table_args__ = (Index("ix_tagging_tags_tag", "tag_id", "person_id"),)
    person_id: str = Field(primary_key=True, max_length=40)
    tag_id: str = Field(primary_key=True, max_length=64)
    rule_set_version: int
    purpose: str = Field(max_length=64)
    category: str = Field(max_length=64)
    description: str = Field(sa_column=Column(Text, nullable=False))
    condition: str = Field(sa_column=Column(Text, nullable=False))
    field_values: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    evidence_count: int
    priority: int
    assigned_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class SuppressedRow(TaggingTable, table=True):
    __tablename__ = "tagging_suppressed"
    person_id: str = Field(primary_key=True, max_length=40)
    tag_id: str = Field(primary_key=True, max_length=64)
    priority: int
    evidence_count: int
    reason: str = Field(max_length=64)


class ObjectionRow(TaggingTable, table=True):
    __tablename__ = "tagging_objections"
    person_id: str = Field(primary_key=True, max_length=40)
    tag_id: str = Field(primary_key=True, max_length=64)
    """The tag objected to; ``*`` for all profiling."""
    reason: str = Field(default="", max_length=1024)
    recorded_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class RuleSetRow(TaggingTable, table=True):
    __tablename__ = "tagging_rule_sets"
    version: int = Field(primary_key=True)
    yaml: str = Field(sa_column=Column(Text, nullable=False))
    actor: str = Field(max_length=128)
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class PopulationRow(TaggingTable, table=True):
    """Population-wide figures refreshed periodically (RFM quintile thresholds)."""

    __tablename__ = "tagging_population"
    name: str = Field(primary_key=True, max_length=64)
    value: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    computed_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


target_metadata = TaggingTable.metadata
OUTBOX_TABLES: Final = outbox_tables(target_metadata, prefix="tagging_")
CONSUMER_TABLES: Final = consumer_tables(target_metadata, prefix="tagging_")
PERSON_LINKS: Final = PersonLinks(person_links_table(target_metadata, prefix="tagging_"))
"""Persons identity merged, so an unmerge hands back every event it should (see
services/common/person_links.py)."""

events_table = EventRow.__table__  # type: ignore[attr-defined]
consents_table = ConsentRow.__table__  # type: ignore[attr-defined]
profiles_table = ProfileRow.__table__  # type: ignore[attr-defined]
tags_table = TagRow.__table__  # type: ignore[attr-defined]
suppressed_table = SuppressedRow.__table__  # type: ignore[attr-defined]
objections_table = ObjectionRow.__table__  # type: ignore[attr-defined]
rule_sets_table = RuleSetRow.__table__  # type: ignore[attr-defined]
population_table = PopulationRow.__table__  # type: ignore[attr-defined]
